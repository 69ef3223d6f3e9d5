#!/usr/bin/env bash
# One-machine sweep service: a Ray head (token auth on) and an MLflow tracking server, both on 127.0.0.1.
#
#   eval "$(cluster/local.sh up)"     # start both; stdout carries only `export` lines
#   cluster/local.sh status           # what runs: pids, ports, alive or not
#   cluster/local.sh down             # stop exactly what `up` started and remove its state
#
# Run it with the project's virtualenv active (`. .venv/bin/activate`) or with PYTHON=.venv/bin/python:
# ray and mlflow are run as `$PYTHON -m ...`, and that interpreter's bin/ is put first on the Ray head's
# PATH, so `python` in a submitted job is the same interpreter.
#
# Settings (environment):
#   PROVLAE_RAY_PORT        GCS port                    (default 6379)
#   PROVLAE_DASHBOARD_PORT  dashboard / Jobs API port   (default 8265)
#   PROVLAE_MLFLOW_PORT     MLflow server port          (default 5000)
#   PROVLAE_MLFLOW_WORKERS  MLflow server workers       (default 1)
#   PROVLAE_RAY_ARGS        extra `ray start` flags, e.g. "--num-cpus 8 --num-gpus 1"
#   PROVLAE_UP_TIMEOUT      seconds `up` waits for both servers to answer   (default 180)
#   PROVLAE_STOP_TIMEOUT    seconds `down` waits after SIGTERM before SIGKILL (default 20)
#   PROVLAE_HOME            data directory (see provlae/paths.py); the state lives in $data_home/cluster
# Each number must be a whole one (ports 1-65535, three different ones): anything else is one
# `local.sh: error: ...` line and exit status 2, before anything starts or is written.
#
# A second `up` while the service runs starts nothing: it says so on stderr, prints the same exports again
# and exits 0, so `eval "$(cluster/local.sh up)"` is safe in every new shell. If only part of a previous
# service is alive, `up` refuses (exit 1) and asks for `down` first.
# Exit status of `status`: 0 running and answering, 1 recorded but dead or not answering, 3 not running.
set -euo pipefail
set +m   # background children stay in our process group, so setsid(1) makes them session leaders in place

PY=${PYTHON:-python}
RAY_PORT=${PROVLAE_RAY_PORT:-6379}
DASHBOARD_PORT=${PROVLAE_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${PROVLAE_MLFLOW_PORT:-5000}
MLFLOW_WORKERS=${PROVLAE_MLFLOW_WORKERS:-1}
UP_TIMEOUT=${PROVLAE_UP_TIMEOUT:-180}
STOP_TIMEOUT=${PROVLAE_STOP_TIMEOUT:-20}
HOST=127.0.0.1

say() { printf 'local.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
bad_setting() { say "error: $*"; exit 2; }   # a setting the user gave: nothing has been started or written

# --- settings -------------------------------------------------------------------------------------------
# Each numeric setting is checked before anything starts: bash would read 'abc' as 0 in arithmetic and 010
# as octal, Ray and MLflow would fail later with a traceback in a log. Values are kept in decimal.
whole_number() {  # variable, its PROVLAE_ name, the least value, what it must be, the most value (optional)
    local given=${!1} least=$3 most=${5:-999999999}
    [[ $given =~ ^[0-9]{1,9}$ ]] || bad_setting "$2 must be $4, got '$given'"
    ((10#$given >= least && 10#$given <= most)) || bad_setting "$2 must be $4, got '$given'"
    printf -v "$1" '%d' "$((10#$given))"
}

check_settings() {
    local name
    for name in RAY DASHBOARD MLFLOW; do
        whole_number "${name}_PORT" "PROVLAE_${name}_PORT" 1 "a port number (1-65535)" 65535
    done
    if ((RAY_PORT == DASHBOARD_PORT || RAY_PORT == MLFLOW_PORT || DASHBOARD_PORT == MLFLOW_PORT)); then
        bad_setting "PROVLAE_RAY_PORT, PROVLAE_DASHBOARD_PORT and PROVLAE_MLFLOW_PORT must differ, got" \
            "$RAY_PORT, $DASHBOARD_PORT and $MLFLOW_PORT"
    fi
    whole_number MLFLOW_WORKERS PROVLAE_MLFLOW_WORKERS 1 "a whole number of workers (at least 1)"
    whole_number UP_TIMEOUT PROVLAE_UP_TIMEOUT 1 "a whole number of seconds (at least 1)"
    check_stop_timeout
}

check_stop_timeout() {
    whole_number STOP_TIMEOUT PROVLAE_STOP_TIMEOUT 0 "a whole number of seconds (0 or more)"
}

# --- small helpers in Python (socket and HTTP checks without curl) --------------------------------------
pyhelp() {
    "$PY" - "$@" <<'EOF'
import socket, sys, urllib.request, urllib.error
cmd, *args = sys.argv[1:]
if cmd == "free-port":                      # an unused loopback port
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
elif cmd == "port-open":                    # exit 0 if something accepts connections on the port
    try:
        socket.create_connection(("127.0.0.1", int(args[0])), timeout=1).close()
    except OSError:
        sys.exit(1)
elif cmd == "http-code":                    # HTTP status of a GET (0 if nothing answers)
    try:
        req = urllib.request.Request(args[0])
        if len(args) > 1:
            req.add_header("Authorization", "Bearer " + open(args[1]).read().strip())
        print(urllib.request.urlopen(req, timeout=3).status)
    except urllib.error.HTTPError as e:
        print(e.code)
    except Exception:
        print(0)
elif cmd == "token":                        # 256 random bits, the format Ray's own generator writes
    import secrets; print(secrets.token_hex(32), end="")
EOF
}

# --- process bookkeeping ----------------------------------------------------------------------------------
alive() {  # pid exists and is not a zombie
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $stat != Z* ]]
}

started_at() { ps -o lstart= -p "$1" 2>/dev/null | tr -s ' ' || true; }

# Every live process of the session led by $1 (Ray puts its workers in their own process groups, inside
# the session) and every descendant of those (a Ray job's driver gets a new session of its own).
session_pids() {
    ps -eo pid=,ppid=,sid=,stat= | awk -v root="$1" '
        { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3; zombie[NR] = ($4 ~ /^Z/) }
        END {
            for (i = 1; i <= NR; i++) if (sid[i] == root || pid[i] == root) mine[pid[i]] = 1
            do {
                grew = 0
                for (i = 1; i <= NR; i++) if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; grew = 1 }
            } while (grew)
            for (i = 1; i <= NR; i++) if ((pid[i] in mine) && !zombie[i]) print pid[i]
        }'
}

# The recorded leader is ours only if it is alive and started when we recorded it (pids get reused).
leader_is_ours() {  # name
    local pid_file="$STATE/$1.pid" pid
    [[ -f $pid_file ]] || return 1
    pid=$(<"$pid_file")
    alive "$pid" && [[ "$(started_at "$pid")" == "$(cat "$STATE/$1.started" 2>/dev/null)" ]]
}

# SIGTERM to the leader's process group and to every process of its session tree; after STOP_TIMEOUT,
# SIGKILL to whatever is left.
stop_leader() {  # name
    local name=$1 pid_file="$STATE/$1.pid" leader pids left deadline
    [[ -f $pid_file ]] || return 0
    leader=$(<"$pid_file")
    if leader_is_ours "$name"; then
        pids=$(session_pids "$leader")
    elif ! alive "$leader"; then
        pids=$(session_pids "$leader" | grep -vx "$leader" || true)   # orphans still in our session
    else
        say "$name: pid $leader now belongs to another process; not touching it"
        return 0
    fi
    [[ -n $pids ]] || return 0
    say "stopping $name (pgid $leader, $(wc -w <<<"$pids") processes)"
    kill -TERM -- "-$leader" 2>/dev/null || true
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while ((SECONDS < deadline)); do
        left=$(for p in $pids; do alive "$p" && echo "$p"; done || true)
        [[ -n $left ]] || return 0
        sleep 0.5
    done
    say "$name: still running after ${STOP_TIMEOUT}s; sending SIGKILL"
    kill -KILL -- "-$leader" 2>/dev/null || true
    # shellcheck disable=SC2086
    kill -KILL $left $(session_pids "$leader") 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        left=$(for p in $pids; do alive "$p" && echo "$p"; done || true)
        [[ -n $left ]] || return 0
        sleep 0.5
    done
    say "$name: processes survived SIGKILL: $left"
    return 1
}

# --- state ------------------------------------------------------------------------------------------------
resolve_state() {
    DATA_HOME=$("$PY" -c 'from provlae.paths import data_home; print(data_home())') \
        || die "cannot import provlae with '$PY': activate .venv or set PYTHON=.venv/bin/python"
    STATE="$DATA_HOME/cluster"
    LOGS="$STATE/logs"
    # The environment of every Ray process of this cluster and of our checks against it: token auth from
    # the token file (RAY_AUTH_TOKEN would win over it), node address on loopback (single-node cluster).
    # A one-node cluster has nothing to drain to: SIGTERM tears it down at once.
    RAY_ENV=(-u RAY_ADDRESS -u RAY_API_SERVER_ADDRESS -u RAY_AUTH_TOKEN
             RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
             RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
             RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0)
}

load_ports() { # shellcheck disable=SC1091
    [[ -f $STATE/ports.env ]] && . "$STATE/ports.env"
}

print_exports() {
    printf 'export RAY_ADDRESS=%q\n' "http://$HOST:$DASHBOARD_PORT"
    printf 'export RAY_AUTH_MODE=token\n'
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$STATE/auth_token"
    printf 'export MLFLOW_TRACKING_URI=%q\n' "http://$HOST:$MLFLOW_PORT"
}

remove_state() {  # everything but the logs and the lock file
    local tmp
    if [[ -f $STATE/ray_tmp ]]; then
        tmp=$(<"$STATE/ray_tmp")
        [[ $tmp == */provlae-ray.* ]] && rm -rf -- "$tmp"
    fi
    rm -f -- "$STATE"/{ray,mlflow}.{pid,started} "$STATE"/{ports.env,auth_token,ray_tmp}
}

lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 60 9 || die "another cluster/local.sh holds $STATE/.lock"
}

# --- up ---------------------------------------------------------------------------------------------------
spawn() {  # name log cmd...  -- new session (setsid), all fds away from the caller, pid/start recorded
    local name=$1 log=$2 pid
    shift 2
    (cd "$STATE" && exec setsid "$@") >"$log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$STATE/$name.pid"
    sleep 0.2
    started_at "$pid" >"$STATE/$name.started"
    [[ "$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]] || say "$name: pid $pid is not a session leader"
}

ray_env() { env "${RAY_ENV[@]}" "$@"; }

check_port_free() {  # port, what it is for, the PROVLAE_*_PORT that sets it
    if pyhelp port-open "$1"; then
        die "port $1 ($2) is already in use on $HOST; choose another with PROVLAE_${3}_PORT"
    fi
}

wait_until_ready() {
    local deadline=$((SECONDS + UP_TIMEOUT)) ray_code=0 ml_code=0
    while ((SECONDS < deadline)); do
        for name in ray mlflow; do
            alive "$(<"$STATE/$name.pid")" || { say "$name exited during start-up; last log lines:"; tail -n 30 "$LOGS/$name.log" >&2; return 1; }
        done
        ray_code=$(pyhelp http-code "http://$HOST:$DASHBOARD_PORT/api/jobs/" "$STATE/auth_token")
        ml_code=$(pyhelp http-code "http://$HOST:$MLFLOW_PORT/health")
        if [[ $ray_code == 200 && $ml_code == 200 ]]; then
            # The GCS with the token, as `ray status` sees it (the Jobs API above already took the token).
            ray_env "$PY" -m ray.scripts.scripts status --address "$HOST:$RAY_PORT" >>"$LOGS/ray-status.log" 2>&1 \
                && return 0
        fi
        sleep 1
    done
    say "servers did not answer within ${UP_TIMEOUT}s (Jobs API: $ray_code, MLflow /health: $ml_code)"
    return 1
}

cmd_up() {
    check_settings
    resolve_state
    lock
    if [[ -f $STATE/ray.pid || -f $STATE/mlflow.pid ]]; then
        if leader_is_ours ray && leader_is_ours mlflow; then
            load_ports
            say "already running (ray pid $(<"$STATE/ray.pid"), mlflow pid $(<"$STATE/mlflow.pid")); state in $STATE"
            print_exports
            return 0
        elif leader_is_ours ray || leader_is_ours mlflow; then
            die "a previous service is partly running (see 'cluster/local.sh status'); run 'cluster/local.sh down' first"
        fi
        say "removing stale state of a service that is no longer running"
        stop_leader ray || true
        stop_leader mlflow || true
        remove_state
    fi

    [[ -z ${RAY_AUTH_TOKEN:-} ]] || say "warning: RAY_AUTH_TOKEN is set in this shell and overrides RAY_AUTH_TOKEN_PATH; unset it"
    check_port_free "$RAY_PORT" "Ray GCS" RAY
    check_port_free "$DASHBOARD_PORT" "Ray dashboard" DASHBOARD
    check_port_free "$MLFLOW_PORT" "MLflow" MLFLOW

    local pybin ray_tmp
    pybin=$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")
    mkdir -p "$LOGS" "$DATA_HOME/mlartifacts"
    (umask 077 && pyhelp token >"$STATE/auth_token")
    # Ray's session sockets need a short path (AF_UNIX paths stop at 107 bytes).
    ray_tmp=$(mktemp -d "${TMPDIR:-/tmp}/provlae-ray.XXXXXX")
    echo "$ray_tmp" >"$STATE/ray_tmp"
    # Ray's fixed auxiliary ports would clash with another Ray on this machine: take free ones.
    local client_port agent_port dash_metrics_port autoscaler_metrics_port
    client_port=$(pyhelp free-port); agent_port=$(pyhelp free-port)
    dash_metrics_port=$(pyhelp free-port); autoscaler_metrics_port=$(pyhelp free-port)
    cat >"$STATE/ports.env" <<EOF
RAY_PORT=$RAY_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
MLFLOW_PORT=$MLFLOW_PORT
EOF
    say "state and logs in $STATE"

    # Experiment tracking only: MLflow's job runner (GenAI scorers, a pool of huey consumers) stays off.
    spawn mlflow "$LOGS/mlflow.log" env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$PY" -m mlflow server \
        --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
        --uvicorn-opts "--timeout-graceful-shutdown 5" \
        --backend-store-uri "sqlite:///$DATA_HOME/mlflow.db" \
        --serve-artifacts --artifacts-destination "$DATA_HOME/mlartifacts"

    # Jobs inherit this environment: they log to this MLflow server and keep data under this data home.
    # shellcheck disable=SC2086
    spawn ray "$LOGS/ray.log" env "${RAY_ENV[@]}" PATH="$pybin:$PATH" PROVLAE_HOME="$DATA_HOME" \
        MLFLOW_TRACKING_URI="http://$HOST:$MLFLOW_PORT" \
        DASHBOARD_METRIC_PORT="$dash_metrics_port" AUTOSCALER_METRIC_PORT="$autoscaler_metrics_port" \
        "$PY" -m ray.scripts.scripts start --head --block --disable-usage-stats \
        --node-ip-address "$HOST" --port "$RAY_PORT" \
        --dashboard-host "$HOST" --dashboard-port "$DASHBOARD_PORT" \
        --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port" \
        --temp-dir "$ray_tmp" ${PROVLAE_RAY_ARGS:-}

    if ! wait_until_ready; then
        say "start-up failed; stopping what was started (logs kept in $LOGS)"
        stop_leader ray || true
        stop_leader mlflow || true
        remove_state
        exit 1
    fi
    say "Ray head: GCS $HOST:$RAY_PORT, dashboard http://$HOST:$DASHBOARD_PORT (token in $STATE/auth_token)"
    say "MLflow:   http://$HOST:$MLFLOW_PORT (backend sqlite:///$DATA_HOME/mlflow.db, artifacts $DATA_HOME/mlartifacts)"
    print_exports
}

# --- down / status ----------------------------------------------------------------------------------------
cmd_down() {
    check_stop_timeout
    resolve_state
    lock
    if [[ ! -f $STATE/ray.pid && ! -f $STATE/mlflow.pid ]]; then
        say "not running (no state in $STATE)"
        remove_state
        return 0
    fi
    local rc=0
    stop_leader ray || rc=1       # Ray first: a finishing job may still log to MLflow
    stop_leader mlflow || rc=1
    load_ports
    for port in "${RAY_PORT:-}" "${DASHBOARD_PORT:-}" "${MLFLOW_PORT:-}"; do
        [[ -n $port ]] && pyhelp port-open "$port" && { say "port $port still answers"; rc=1; }
    done
    remove_state
    ((rc == 0)) && say "stopped; state removed (logs kept in $LOGS)"
    return $rc
}

cmd_status() {
    resolve_state
    if [[ ! -f $STATE/ray.pid && ! -f $STATE/mlflow.pid ]]; then
        echo "not running (no state in $STATE)"
        return 3
    fi
    load_ports
    local rc=0 pid code
    for name in ray mlflow; do
        pid=$(cat "$STATE/$name.pid" 2>/dev/null || echo none)
        if leader_is_ours "$name"; then
            echo "$name: running, pid/pgid $pid, $(session_pids "$pid" | wc -l) processes"
        else
            echo "$name: not running (recorded pid $pid)"; rc=1
        fi
    done
    code=$(pyhelp http-code "http://$HOST:$DASHBOARD_PORT/api/jobs/" "$STATE/auth_token")
    echo "ray gcs:        $HOST:$RAY_PORT $(pyhelp port-open "$RAY_PORT" && echo open || echo closed)"
    echo "ray dashboard:  http://$HOST:$DASHBOARD_PORT (Jobs API with token: HTTP $code)"
    [[ $code == 200 ]] || rc=1
    code=$(pyhelp http-code "http://$HOST:$MLFLOW_PORT/health")
    echo "mlflow:         http://$HOST:$MLFLOW_PORT (/health: HTTP $code)"
    [[ $code == 200 ]] || rc=1
    echo "state:          $STATE"
    return $rc
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: cluster/local.sh up|down|status   (eval \"\$(cluster/local.sh up)\" sets the shell up)" >&2; exit 2 ;;
esac
