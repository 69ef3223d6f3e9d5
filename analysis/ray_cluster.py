"""Joining a Ray cluster, or starting a local Ray, for a driver: a sweep's (sweeps/driver.py) and the
evaluation stage's (analysis/evaluate.py).

Before the driver connects: an address a driver can join (not the dashboard's) and a token the cluster
takes, each miss one ConfigError saying what to use instead (cluster/README.md, "Many machines").
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from provlae.errors import ConfigError
from provlae.text import last_line

REPO_ROOT = Path(__file__).resolve().parents[1]
GCS_TIMEOUT_S = 10  # the token check's one call to the GCS (nothing listening: about 10 s more to connect)
GET_TOKEN = "`ray get-auth-token` on the cluster's head prints it"


# ------------------------------------------------------------------------- before connecting


def driver_address(address: str | None) -> tuple[str | None, str]:
    """The address ``ray.init`` will join and where it comes from: ``--address``, else $RAY_ADDRESS
    (which ray.init also puts in place of ``auto``)."""
    env = os.environ.get("RAY_ADDRESS")
    if env and address in (None, "auto"):
        return env, "RAY_ADDRESS"
    return address, "--address"


def check_driver_address(address: str | None, source: str = "--address") -> None:
    """A driver joins the GCS (HOST:6379, or ``auto`` on a node of the cluster); the dashboard's http://
    address is the Jobs API, where ``ray.init`` would try a Ray Client and fail."""
    if address and address.strip().lower().startswith(("http://", "https://")):
        raise ConfigError(f"{source} {address} is the Ray dashboard's Jobs API address, which `ray job submit "
                          f"--address` takes; a driver joins the cluster at its GCS address (HOST:6379) or "
                          f"`auto` on one of its nodes: pass --address HOST:6379, or submit the sweep with "
                          f"`ray job submit --address {address} -- python sweeps/...`")


def check_token(address: str) -> None:
    """Ask the GCS at ``address`` once for the cluster id, with this driver's token, before ray.init: a
    missing or refused token, or no GCS there, is one ConfigError within about 2 * GCS_TIMEOUT_S (ray.init
    would retry for 20 s, log every refusal, and then say only that it could not connect)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # another Ray: ray.init alone decides
        return
    if "://" in address:  # a Ray Client (ray://): its server checks the driver its own way
        return
    try:
        gcs = canonicalize_bootstrap_address(address)
    except ValueError:
        raise ConfigError(f"{address!r} is not a Ray address: use HOST:PORT (the GCS, port 6379 by default) "
                          f"or auto") from None
    if gcs is None:  # local: a new Ray on this machine
        return
    token_auth = is_token_auth_enabled()
    if token_auth and not has_token():  # (Ray's GCS client would abort the process rather than raise)
        raise ConfigError(f"no Ray token for the cluster at {address}: RAY_AUTH_MODE=token, but neither "
                          f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH nor ~/.ray/auth_token holds one; set "
                          f"RAY_AUTH_TOKEN to the cluster's token ({GET_TOKEN})")
    error = ask_gcs(gcs)
    if error == "refused" and token_auth:
        raise ConfigError(f"the Ray cluster at {address} refused this driver's token (from {token_source()}): "
                          f"set RAY_AUTH_TOKEN to the cluster's token ({GET_TOKEN})")
    if error == "refused":
        raise ConfigError(f"the Ray cluster at {address} requires a token and this driver sent none "
                          f"(RAY_AUTH_MODE is not 'token'): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to "
                          f"the cluster's token ({GET_TOKEN})")
    if error:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {error} (is a Ray head running "
                          f"there? `ray start --head` prints its address)")


def has_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        return AuthenticationTokenLoader.instance().has_token()
    except AuthenticationError:  # token auth on and no token anywhere
        return False


def ask_gcs(gcs: str) -> str | None:
    """One call to the GCS at ``gcs`` (HOST:PORT): None when it answers, "refused" when it refuses this
    driver's token, else what went wrong. Ray's C++ client logs each failed call to stderr: kept out of
    the way when the call fails (the caller says what happened), shown when it succeeds."""
    from ray._raylet import InnerGcsClient
    from ray.exceptions import AuthenticationError, RayError

    logged = bytearray()
    with native_stderr(logged):
        try:
            InnerGcsClient.standalone(gcs, None, GCS_TIMEOUT_S * 1000)
        except AuthenticationError:
            return "refused"
        except (RayError, ConnectionError, TimeoutError) as e:  # RpcError: nothing answered in time
            return (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    os.write(2, logged)
    return None


def token_source() -> str:
    """Where Ray takes the driver's token from: the variable, else the file it names, else the default file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH {os.environ['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token"


@contextlib.contextmanager
def native_stderr(logged: bytearray):
    """File descriptor 2 into ``logged`` for the block: Ray's C++ client writes a warning line there for
    each refused call, beside the one error line a refused driver gets."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            logged.extend(sink.read())


# ------------------------------------------------------------------------------------------ Ray


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` / $RAY_ADDRESS (set for drivers under ``ray job submit``), else start a local Ray:
    no dashboard, no idle workers started ahead, and the repository on the workers' path wherever this
    script is run from. A dashboard (http://) address, or a token the cluster does not take, is a
    ConfigError before ray.init. ray.init's own "Connecting to / Started a local Ray" lines are left out,
    so that a sweep refused once Ray is up (sweeps/cluster_checks.py) says its one error line alone; the
    "ray" logger is then at INFO, as ray.init leaves it."""
    import logging

    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return
    address, source = driver_address(address)
    if address:
        check_driver_address(address, source)
        check_token(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, AuthenticationError) as e:
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {last_line(str(e))}") from None
    else:
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        # address="local": never silently join another user's `ray start` cluster on this machine. No
        # workers started ahead: they would lack the job's runtime_env, so no task of it could use them.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 _system_config={"prestart_worker_first_driver": False})
    logging.getLogger("ray").setLevel(logging.INFO)
