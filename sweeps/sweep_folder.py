"""A sweep's folder in Ray storage (a local path, NFS, or ``s3://…``): its manifest and its lease.

The manifest records what the folder was started with — a grid or a search, its trials, and the MLflow
store its runs live in — so a rerun that asks for anything else is refused before anything is created.
Manifests are written whole (a temporary file moved into place); a damaged one is one error, not a guess.

The lease says which driver runs the sweep now. It is a small file in the sweep folder, renewed every
``RENEW_EVERY`` seconds by the driver holding it, so it works wherever the storage is shared: a second
driver on any machine sees it and refuses. A driver that died leaves its lease behind; the next driver
takes it over at once when the dead one ran on the same machine (its process is gone), else once the
lease has not been renewed for ``LEASE_TTL`` seconds.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from provlae.atomic import write_atomic
from provlae.errors import ConfigError
from provlae.text import first_line

GRID_MANIFEST = "provlae_sweep.json"
SEARCH_MANIFEST = "provlae_search.json"
KINDS = {"grid": GRID_MANIFEST, "search": SEARCH_MANIFEST}
LEASE = "provlae_lease.json"
LEASE_TTL = 60.0  # seconds without renewal after which a lease from another machine is taken over
RENEW_EVERY = 15.0
SETTLE = 1.0  # seconds between writing a lease and reading it back: two drivers starting at once


def filesystem(folder: str):
    """(pyarrow file system, path inside it) of a local folder or a storage URI."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(folder if "://" in folder else Path(folder).as_uri())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--storage {folder}: {first_line(e, type(e).__name__)}") from None


def read_json(folder: str, name: str) -> dict[str, Any] | None:
    """The JSON object ``name`` in ``folder``; None when there is none; ConfigError when it is damaged."""
    import pyarrow.fs

    fs, path = filesystem(folder)
    target = f"{path}/{name}"
    try:
        if fs.get_file_info(target).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(target) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {folder}/{name}: {first_line(e, type(e).__name__)}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        data, why = None, f"not JSON: {e}"
    else:
        why = "not a JSON object"
    if not isinstance(data, dict):
        raise DamagedFile(f"sweep folder {folder}: {name} is damaged ({why}), so it cannot tell what the folder "
                          f"holds: start a new sweep with another --name (or remove the folder)")
    return data


class DamagedFile(ConfigError):
    """A manifest or lease that is not the JSON object it should be."""


def write_json(folder: str, name: str, data: dict[str, Any]) -> None:
    """Write ``name`` whole: a temporary file beside it, moved into place (a reader never sees half). A
    local folder's file is fsync'ed too (``provlae.atomic``); remote storage has its own guarantees."""
    import pyarrow.fs

    fs, path = filesystem(folder)
    text = json.dumps(data, indent=1).encode()
    try:
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            write_atomic(Path(path) / name, text)
            return
        tmp = f"{path}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        fs.create_dir(path)
        with fs.open_output_stream(tmp) as f:
            f.write(text)
        fs.move(tmp, f"{path}/{name}")
    except OSError as e:
        raise ConfigError(f"cannot write to --storage {folder}: {first_line(e, type(e).__name__)}") from None


def remove(folder: str, name: str) -> None:
    fs, path = filesystem(folder)
    try:
        fs.delete_file(f"{path}/{name}")
    except OSError:  # gone already
        pass


def check_kind(folder: str, kind: str) -> None:
    """Refuse a grid in a search's folder and a search in a grid's (one --name for both)."""
    import pyarrow.fs

    fs, path = filesystem(folder)
    for other, name in KINDS.items():
        if other != kind and fs.get_file_info(f"{path}/{name}").type == pyarrow.fs.FileType.File:
            what = {"grid": "a grid sweep (sweeps/full_grid.py)", "search": "an Optuna search (sweeps/optuna_search.py)"}
            raise ConfigError(f"sweep folder {folder} holds {what[other]}, not {what[kind]}: pass another --name")


def check_store(folder: str, saved: dict[str, Any], tracking_uri: str, experiment: str) -> None:
    """A sweep resumes into the MLflow store it started in (its runs and their steps are there)."""
    if "tracking_uri" not in saved:  # recorded before the store was: it is recorded on this run
        return
    before, now = (saved["experiment"], saved["tracking_uri"]), (experiment, tracking_uri)
    if before != now:
        raise ConfigError(f"sweep folder {folder} was started in MLflow experiment {before[0]!r} at "
                          f"{display_uri(before[1])}, not experiment {now[0]!r} at {display_uri(now[1])}: repeat "
                          f"its --experiment and --tracking-uri to resume it, or pass --name for a new sweep")


STORE_FIELDS = ("tracking_uri", "experiment")  # the MLflow store a manifest records


def store_fields(tracking_uri: str, experiment: str) -> dict[str, str]:
    return dict(zip(STORE_FIELDS, (tracking_uri, experiment)))


def display_uri(uri: str) -> str:
    """``uri`` without a password in it."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# ------------------------------------------------------------------------------------------ the lease


def _machine() -> str:
    """This machine and process namespace: a pid means the same process only within the same one."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' if unknown): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive_here(lease: dict[str, Any]) -> bool | None:
    """Whether the lease's driver still runs, when it ran on this machine; None when it ran elsewhere."""
    if lease.get("machine") != _machine():
        return None
    pid = int(lease.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _process_start(pid) == lease.get("process_start", "")


class SweepLease:
    """The lease of one sweep folder, held by this driver from ``acquire`` to ``release``."""

    def __init__(self, folder: str, sweep: str, created: list[str]):
        self.folder, self.sweep, self.created = folder, sweep, created
        self.owner = uuid.uuid4().hex
        self.record = {"owner": self.owner, "sweep": sweep, "host": socket.gethostname(), "machine": _machine(),
                       "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                       "command": " ".join(sys.argv)[:500],
                       "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.taken_over: dict[str, Any] | None = None  # the dead driver's lease this one replaced

    @classmethod
    def acquire(cls, folder: str, sweep: str) -> "SweepLease":
        """Take the folder's lease, or raise ConfigError naming the live driver that holds it."""
        import pyarrow.fs

        fs, path = filesystem(folder)
        created = []  # the folders the lease's file makes, deepest first (a new --storage too)
        try:
            at = path.rstrip("/")
            while at and fs.get_file_info(at).type == pyarrow.fs.FileType.NotFound:
                created.append(at)
                at = at.rsplit("/", 1)[0] if "/" in at.strip("/") else ""
        except OSError as e:
            raise ConfigError(f"cannot use --storage {folder}: {first_line(e, type(e).__name__)}") from None
        try:
            held = read_json(folder, LEASE)
        except DamagedFile:
            held = None  # a lease is written whole: a damaged one holds nobody
        if held is not None and held_by_live_driver(held):
            raise ConfigError(describe_holder(held, folder))
        lease = cls(folder, sweep, created)
        lease.taken_over = held
        lease._write()
        time.sleep(SETTLE)
        now = read_json(folder, LEASE)
        if now is None or now.get("owner") != lease.owner:  # another driver wrote it meanwhile: it runs the sweep
            raise ConfigError(describe_holder(now or {}, folder))
        lease._thread = threading.Thread(target=lease._renew, name="provlae-lease", daemon=True)
        lease._thread.start()
        return lease

    def _write(self) -> None:
        write_json(self.folder, LEASE, {**self.record, "renewed": time.time(), "ttl": LEASE_TTL})

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY):
            try:
                now = read_json(self.folder, LEASE)
                if now is not None and now.get("owner") != self.owner:
                    print(f"warning: another driver took over sweep {self.sweep!r} ({describe_holder(now, self.folder)}); "
                          f"stopping this one", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGINT)  # Tune ends the run as on Ctrl-C
                    return
                self._write()
            except ConfigError:  # the storage did not answer this time: the lease outlives a few misses
                continue

    def release(self) -> None:
        """Give the lease up (only if still this driver's), and the folder if it was made for it alone."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            now = read_json(self.folder, LEASE)
        except ConfigError:
            return
        if now is not None and now.get("owner") == self.owner:
            remove(self.folder, LEASE)
        import pyarrow.fs

        fs, _ = filesystem(self.folder)
        for path in self.created:  # a driver that stopped before its sweep began leaves no empty folder
            try:
                if fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
                    return
                fs.delete_dir(path)
            except OSError:
                return

    def __enter__(self) -> "SweepLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held_by_live_driver(lease: dict[str, Any]) -> bool:
    here = _alive_here(lease)
    if here is not None:
        return here
    return time.time() - float(lease.get("renewed", 0)) < float(lease.get("ttl", LEASE_TTL))


def describe_holder(lease: dict[str, Any], folder: str) -> str:
    if not lease:
        return f"another driver is starting sweep folder {folder} at this moment: rerun in a minute"
    age = max(0.0, time.time() - float(lease.get("renewed", 0)))
    return (f"sweep {lease.get('sweep')!r} is already running: its driver (pid {lease.get('pid')} on "
            f"{lease.get('host')}) has held {folder} since {lease.get('since')} (renewed {age:.0f} s ago). Wait for "
            f"it to end or stop it (ray job stop, or kill {lease.get('pid')} on {lease.get('host')}); a lease not "
            f"renewed for {float(lease.get('ttl', LEASE_TTL)):.0f} s is taken over")


# ---------------------------------------------------------------------------------- Tune's own state


def check_tune_state(folder: str, restartable: bool) -> bool:
    """Whether Tune's saved state in ``folder`` is damaged and the sweep must start its Tuner afresh.

    Tune writes ``experiment_state-<session>.json`` per driver run and restores from the newest. When that
    one is damaged (truncated by a full disk, say), an older one is no way back: it names checkpoints Tune
    has since deleted. A grid (``restartable``) starts again in the same folder instead — the damaged state
    renamed ``….damaged``, the others ``….superseded`` — and loses nothing: trials finished in MLflow are not
    trained again, and the others replay from step 0 into their runs, which skip the steps they hold (the
    replay is bitwise the same). A search cannot: the points its searcher sampled and what it learned
    from their scores live only in that state, and a fresh searcher would try other points: one error."""
    import fnmatch

    import pyarrow.fs

    fs, path = filesystem(folder)
    try:
        names = [Path(i.path).name for i in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))]
    except OSError as e:
        raise ConfigError(f"cannot read sweep folder {folder}: {first_line(e, type(e).__name__)}") from None
    states = sorted(fnmatch.filter(names, "experiment_state-*.json"))
    if not states:
        return False
    newest = states[-1]
    try:
        with fs.open_input_stream(f"{path}/{newest}") as f:
            state = json.loads(f.read())
        if not isinstance(state, dict) or "trial_data" not in state:
            raise ValueError("no trial data in it")
        return False
    except (OSError, ValueError) as e:
        why = first_line(e, type(e).__name__)
    if not restartable:
        raise ConfigError(f"sweep folder {folder}: Tune's saved state {newest} is damaged ({why}), so the search "
                          f"cannot be resumed: start it again under another --name")
    try:
        for name in states:
            fs.move(f"{path}/{name}", f"{path}/{name}.{'damaged' if name == newest else 'superseded'}")
    except OSError as e:
        raise ConfigError(f"cannot write to --storage {folder}: {first_line(e, type(e).__name__)}") from None
    print(f"note: Tune's state {newest} in {folder} is damaged ({why}); set aside as {newest}.damaged. The grid "
          f"starts again in the same folder: trials finished in MLflow are not trained again, the others start "
          f"over into their runs", flush=True)
    return True
