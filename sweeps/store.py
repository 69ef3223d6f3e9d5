"""Reaching the MLflow tracking store: its URI made absolute, a check before Ray starts, and the client a
trial uses, which waits out a server that is away (``PatientClient``).
"""
from __future__ import annotations

import base64
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from provlae.errors import ProvlaeError
from provlae.text import first_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

PATIENCE = 300.0  # seconds a trial waits for an unreachable tracking server before it fails (--tracking-patience)
RETRY_EVERY = 5.0  # seconds between a trial's tries of a call while the server is away
# Inside a trial, MLflow's own retries are kept short, so the patience above is what bounds a wait (its
# defaults, 7 retries with backoff factor 2, take about four minutes per call). The user's settings win.
TRIAL_CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(ProvlaeError):
    """The tracking store cannot be reached or used."""


def normalize_uri(uri: str) -> str:
    """Absolute form of a local store's URI: trials run in their own directories (and jobs in a
    temporary working_dir), so a relative sqlite or file path would scatter results."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        return f"sqlite:///{sqlite_path(uri)}"
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        return Path(path).expanduser().resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path:
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri[len("sqlite://"):]
    return Path(path).expanduser().resolve()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError, within ``timeout`` seconds, unless the store at ``uri`` can be used. A server
    is asked ``/health`` and then one API call with the client's credentials (MLflow's own environment:
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``), so missing
    or wrong credentials, or an API that fails behind a healthy /health, are one error before Ray starts."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        base = uri.rstrip("/")
        _get(f"{base}/health", uri, timeout, {})
        _get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", uri, timeout, auth_headers())
    elif parsed.scheme in ("sqlite", "file"):
        folder = sqlite_path(uri).parent if parsed.scheme == "sqlite" else Path(parsed.path)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking store {uri}: cannot create {folder} ({e.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking store {uri}: {folder} is not writable")


def auth_headers() -> dict[str, str]:
    """The Authorization header MLflow's client sends, from the same environment variables."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def _get(url: str, uri: str, timeout: float, headers: dict[str, str]) -> None:
    what = "/health" if url.endswith("/health") else "its API"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            if response.status != 200:
                raise TrackingError(f"tracking server {uri} answered {response.status} on {what}")
    except urllib.error.HTTPError as e:
        if e.code == 401:
            given = "were refused" if headers else "are missing"
            raise TrackingError(f"tracking server {uri} requires authentication and the credentials {given} "
                                f"(HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        if e.code == 403:
            raise TrackingError(f"tracking server {uri}: user {os.environ.get('MLFLOW_TRACKING_USERNAME')!r} "
                                f"may not read experiments (HTTP 403): ask its admin for permission") from None
        raise TrackingError(f"tracking server {uri} answered HTTP {e.code} on {what}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"tracking server {uri} is not reachable ({reason})") from None


def client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def unreachable(e: BaseException) -> bool:
    """Whether an MLflow call failed because the server did not answer (connection refused or reset, a
    timeout, 5xx answers past the client's retries), rather than with an answer of the server's."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(e, RestException) or not isinstance(e, MlflowException):
        return False
    return "failed with exception" in e.message or "failed with timeout exception" in e.message


class PatientClient:
    """An MlflowClient whose calls wait out an unreachable tracking server: a call that cannot reach it is
    tried again every ``RETRY_EVERY`` seconds for up to ``patience`` seconds, then raises TrackingError
    naming the server and the wait. Calls the server answers (with a result or an error) pass unchanged.
    A call repeated after a lost answer is safe here: metric values carry their own timestamps (the
    server keeps one of identical values) and a run created twice is resolved by its trial key.

    The patience is spent once: after a call has waited it out, the next call the server does not answer
    raises at once (a driver's end of 100 failed trials waits 300 s, not 100 times as long), until a call
    reaches the server again."""

    def __init__(self, inner: MlflowClient, patience: float):
        self._inner, self._patience = inner, patience
        self._gave_up = False  # a call waited the whole patience; none reached the server since

    @property
    def tracking_uri(self) -> str:
        return self._inner.tracking_uri

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            deadline = None
            while True:
                try:
                    result = attr(*args, **kwargs)
                    self._gave_up = False
                    return result
                except Exception as e:
                    if not unreachable(e):
                        raise
                    now = time.monotonic()
                    deadline = deadline if deadline is not None else now + self._patience
                    if now >= deadline or self._gave_up:
                        self._gave_up = True
                        cause = first_line(str(e), limit=200)
                        raise TrackingError(f"tracking server {self.tracking_uri} was unreachable for more than "
                                            f"{self._patience:g} s (--tracking-patience): {cause}") from None
                    time.sleep(min(RETRY_EVERY, deadline - now))

        return call


def patient_client(uri: str, patience: float = PATIENCE) -> PatientClient:
    """The client a trial uses (MLflow's own retries kept short unless the user set them)."""
    for key, value in TRIAL_CLIENT_RETRIES.items():
        os.environ.setdefault(key, value)
    return PatientClient(client(uri), patience)
