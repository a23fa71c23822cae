"""MLflow tracking: one pipeline job (a stage writing one output directory) = one MLflow run.

A job's run is found again in the store, by its output directory (tag `nern.out`) and a digest of its
result-affecting config (tag `nern.config`), whatever the run's status (`find_job_run`): a job killed at any
point and rerun, even after its run was marked FINISHED but before the process exited, continues its run.

The default store is an embedded SQLite file, `sqlite:///<results>/mlflow.db`, so a user needs no server;
an `http(s)://` URI switches to a tracking server, `none` switches tracking off. Parallel pipeline jobs write
to the same SQLite file at once, so:

- the first use of a fresh store (MLflow creates its tables then) is serialised with a file lock next to
  the database: MLflow 3.17 runs its schema migrations unguarded, and 8 processes opening a fresh store at
  once fail with "table ... already exists" / "duplicate column" and can leave a half-migrated schema;
- every MLflow call goes through `_retry`, which retries transient failures ("database is locked",
  `OperationalError`, `TEMPORARILY_UNAVAILABLE`) with exponential backoff and jitter for up to 120 s
  (`$NERN_MLFLOW_RETRY_S`);
- two processes creating the same experiment race; the loser re-fetches it by name.

A tracking server can go away: `_retry` also waits out what means "try again" from a server (connection
refused or reset, time-outs, HTTP 408/429/502/503/504), on top of MLflow's own HTTP retries
(`client_retry_budget_s`), and fails at once, in one line, on rejected credentials (401/403). A job given a
journal (`nern.journal`, beside its outputs) writes every call there first; when the store stays away past the
budget the job goes on offline and replays the journal when it ends, or leaves it for `nern track sync`
(`sync_results`), which makes any store hold a finished results tree, idempotently. A create request that
MLflow's client re-sent after a lost answer can leave a twin run; twins (same job, same start time) are
deleted at once.

Runs are grouped: a job given a parent name (the pipeline passes its preset) becomes a child run
(`mlflow.parentRunId`) of the one run tagged `nern.parent=<name>`, created by the first job that needs it (under
a file lock: the SQLite file's, or `<results>/.mlflow-parent.lock` for a server), so the MLflow UI shows one
expandable row per preset. Each job logs the data set it read as an MLflow dataset input (name, source,
digest), and can log system metrics (CPU, memory) while it runs.

MLflow is imported lazily: `import nern` must stay fast and work without it when tracking is off.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from nern.errors import NernError
from nern.journal import JOURNAL_NAME, VERSION as JOURNAL_VERSION, Journal, find_journals, iter_ops, now_ms

T = TypeVar("T")

DISABLED = "none"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RETRY_BUDGET_S = 120.0
RETRY_ENV = "NERN_MLFLOW_RETRY_S"  # overrides RETRY_BUDGET_S (seconds), e.g. shorter in tests
PARENT_LOCK = ".mlflow-parent.lock"
HEALTH_TIMEOUT_S = 5.0

# MLflow's own limits (mlflow.utils.validation); kept here so the module imports without mlflow.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TRUNCATION_MARK = "...[truncated]"

# Error texts that mean the store is broken, not busy: retrying them only delays the error.
_PERMANENT_MARKERS = (
    "no such table",
    "no such column",
    "already exists",
    "duplicate column",
    "readonly database",
    "database or disk is full",
    "malformed",
)
# What a server (or the proxy before it) answers when it is restarting or overloaded.
_TRANSIENT_STATUS = (408, 429, 502, 503, 504)
_AUTH_STATUS = (401, 403)
_STATUS_IN_TEXT = re.compile(r"error code (\d{3})\b|too many (\d{3}) error responses")
# The texts of connection failures, for errors that reach us only as text (MLflow wraps them in its own).
_CONNECTION_MARKERS = (
    "connection refused",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "remotedisconnected",
    "broken pipe",
    "timed out",
    "failed to establish a new connection",
)
_AUTH_CODES = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@")
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- URIs


def default_uri(results_dir: str | os.PathLike) -> str:
    """The embedded store of a results directory; absolute, so jobs started elsewhere agree on it."""
    return f"sqlite:///{Path(results_dir).resolve() / DB_NAME}"


def default_tracking_uri(uri: str | None = None, results_dir: str | os.PathLike = "results") -> str:
    """The store a stage logs to: `uri` (--mlflow-uri), else $NERN_MLFLOW_URI, else $MLFLOW_TRACKING_URI, else
    the results directory's SQLite file; `none` (any case) switches tracking off. The one place the default
    is spelled: the CLI and the workflow both ask here."""
    candidates = (uri, os.environ.get("NERN_MLFLOW_URI"), os.environ.get("MLFLOW_TRACKING_URI"))
    chosen = next((c.strip() for c in candidates if c and c.strip()), "")
    if not chosen:
        return default_uri(results_dir)
    if chosen.lower() == DISABLED:
        return DISABLED
    if "://" not in chosen and not chosen.startswith("sqlite:"):
        raise NernError(
            f"tracking URI {chosen!r} has no scheme; use sqlite:///<abs path>/mlflow.db, http://host:port or none"
        )
    if chosen.startswith("sqlite:///"):
        return _absolute_sqlite(chosen)
    if urllib.parse.urlsplit(chosen).password is not None:
        raise NernError(f"tracking URI {redact(chosen)} carries a password, which every job command would print; "
                        "drop it from the URI and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
    return chosen


def _absolute_sqlite(uri: str) -> str:
    """`sqlite:///rel.db` is relative to the cwd, which differs between Snakemake jobs: pin it."""
    path, _, query = uri.removeprefix("sqlite:///").partition("?")
    if not path or path == ":memory:":
        raise NernError(f"tracking URI {uri!r} names no database file; use sqlite:///<abs path>/mlflow.db")
    absolute = f"sqlite:///{Path(path).resolve()}"
    return f"{absolute}?{query}" if query else absolute


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0])


def redact(text: str) -> str:
    """`text` with the user:password@ part of every URL in it masked: messages must never carry credentials."""
    return _USERINFO.sub(r"\1***@", text)


def store_reachable(uri: str) -> bool:
    """Whether a tracking server answers at all (one quick /health request, no retries); other stores: True."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        answer = requests.get(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S)
    except requests.exceptions.SSLError:
        return True  # it answered; MLflow's client has the TLS settings (MLFLOW_TRACKING_SERVER_CERT_PATH, ...)
    except requests.RequestException:
        return False
    return answer.status_code not in _TRANSIENT_STATUS


# ----------------------------------------------------------------------------------------- retrying


class StoreUnavailable(NernError):
    """The store stayed locked or unreachable for the whole retry budget; a job with a journal goes on offline."""


def retry_budget_s() -> float:
    """How long `_retry` keeps trying one call: $NERN_MLFLOW_RETRY_S seconds, default RETRY_BUDGET_S."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return RETRY_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise NernError(f"${RETRY_ENV}={text!r} is not a number of seconds; unset it or set e.g. {RETRY_BUDGET_S:.0f}")
    return value


def client_retry_budget_s() -> float:
    """The longest MLflow's own HTTP client sleeps between the attempts of one call before it gives up (urllib3
    Retry: no sleep before the first retry, then BACKOFF_FACTOR * 2**(n-1) s before retry n, at most 120 s
    each, plus up to BACKOFF_JITTER s), from $MLFLOW_HTTP_REQUEST_MAX_RETRIES (7), _BACKOFF_FACTOR (2) and
    _BACKOFF_JITTER (1): about 250 s with the defaults. Each attempt may also wait up to
    $MLFLOW_HTTP_REQUEST_TIMEOUT (120 s) for an answer."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    )

    retries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    jitter = MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get()
    return sum(min(120.0, factor * 2 ** (n - 1) + jitter) for n in range(2, retries + 1))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes (MLflow wraps connection errors in its own exception)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status a store error carries: in MLflow's message, or its error code."""
    match = _STATUS_IN_TEXT.search(str(exc))
    if match:
        return int(match.group(1) or match.group(2))
    code = getattr(exc, "error_code", None)
    if code in _AUTH_CODES:
        return _AUTH_CODES[code]
    return 503 if code == "TEMPORARILY_UNAVAILABLE" else None


def _auth_status(exc: BaseException) -> int | None:
    """401 or 403 when the server refused the credentials (or their rights), else None."""
    return next((s for s in map(_http_status, _chain(exc)) if s in _AUTH_STATUS), None)


def _is_connection_error(exc: BaseException) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - mlflow depends on requests
        requests = None
    if requests is not None and isinstance(exc, requests.exceptions.SSLError):
        return False  # a certificate problem does not go away by waiting
    classes: tuple[type, ...] = (ConnectionError, TimeoutError)
    if requests is not None:
        classes += (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError)
    return isinstance(exc, classes) or any(marker in str(exc).lower() for marker in _CONNECTION_MARKERS)


def _is_lock(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def _is_transient(exc: BaseException) -> bool:
    """Worth waiting for: lock contention, TEMPORARILY_UNAVAILABLE, and a server that is away (connection
    refused/reset, time-outs, 408/429/502/503/504). Schema errors and rejected credentials are not."""
    if any(marker in str(exc).lower() for marker in _PERMANENT_MARKERS) or _auth_status(exc) is not None:
        return False
    if _is_lock(exc):
        return True
    for link in _chain(exc):
        if _http_status(link) in _TRANSIENT_STATUS or _is_connection_error(link):
            return True
    return type(exc).__name__ == "OperationalError"  # sqlite3's and SQLAlchemy's


def _auth_error(status: int, what: str) -> NernError:
    if status == 401:
        return NernError(f"the MLflow tracking server rejected the credentials (HTTP 401) when asked to {what}; "
                         "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server")
    return NernError(f"the MLflow account in MLFLOW_TRACKING_USERNAME may not {what} (HTTP 403); ask the server's "
                     "admin for EDIT permission on the experiment, or use another account")


def _reason(exc: BaseException) -> str:
    """What went wrong, in a few words (MLflow's messages run to several hundred characters)."""
    text = " ".join(str(exc).split())
    status = next((s for s in map(_http_status, _chain(exc)) if s), None)
    if status is not None:
        return f"HTTP {status}"
    marker = next((m for m in _CONNECTION_MARKERS if m in text.lower()), None)
    if marker is not None:
        return marker
    return "database is locked" if _is_lock(exc) else redact(text)[:200]


def _unavailable(exc: BaseException, what: str, budget: float) -> StoreUnavailable:
    hint = ("run fewer jobs in parallel or use a tracking server (tracking URI http://host:port)" if _is_lock(exc)
            else "check that the tracking server is up")
    return StoreUnavailable(f"MLflow store stayed unavailable for {budget:.3g} s while trying to {what} "
                            f"({_reason(exc)}): {hint}")


def _retry(call: Callable[[], T], what: str, budget_s: float | None = None) -> T:
    """Run `call`, retrying transient store errors with exponential backoff and full jitter for `budget_s`
    (default `retry_budget_s()`); rejected credentials fail at once with one clear line."""
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return call()
        except NernError:
            raise
        except Exception as exc:
            status = _auth_status(exc)
            if status is not None:
                raise _auth_error(status, what) from None
            if not _is_transient(exc):
                raise
            delay = random.uniform(0.5, 1.5) * min(5.0, 0.05 * 2**attempt)
            if time.monotonic() + delay > deadline:
                raise _unavailable(exc, what, budget) from exc
            attempt += 1
            time.sleep(delay)


class _DropLockNoise(logging.Filter):
    """MLflow logs a full traceback for every locked transaction; `_retry` handles those, so drop them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


def _quiet_lock_logs() -> None:
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _DropLockNoise) for f in logger.filters):
        logger.addFilter(_DropLockNoise())


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock on `path` (created), across processes; no lock when `path` is None."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _store_init_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """Serialise opening a SQLite store across processes (MLflow's table creation is not race-safe)."""
    db = sqlite_path(uri)
    return _file_lock(None if db is None else db.with_name(db.name + ".lock"))


def _parent_lock(uri: str, results_dir: str | os.PathLike | None) -> Path | None:
    """Where jobs serialise creating a parent run: beside the SQLite file, or in an existing results directory
    (shared by the pipeline's jobs, on a cluster too) for a server; None: no lock (twins are then resolved to
    the oldest by every later lookup)."""
    db = sqlite_path(uri)
    if db is not None:
        return db.with_name(db.name + ".lock")
    if results_dir is not None and Path(results_dir).is_dir():
        return Path(results_dir) / PARENT_LOCK
    return None


# ------------------------------------------------------------------------------------------ values


_KEY_BAD_CHARS = re.compile(r"[^\w\-. /:]")


def _key(key: Any) -> str:
    """MLflow accepts alphanumerics, _ - . space / : in keys, at most 250 characters."""
    return _KEY_BAD_CHARS.sub("_", str(key))[:MAX_KEY]


def _truncate(value: Any, limit: int) -> str:
    """Stringify and cut to MLflow's length limit, marking the cut so nobody trusts a partial value."""
    text = str(value)
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "experiment"


# ------------------------------------------------------------------------------------------ tracker


RESUME_TAG = "nern.out"  # the job's key: its output directory
CONFIG_TAG = "nern.config"  # digest of the job's result-affecting config
PARENT_TAG = "nern.parent"  # the name of a parent run (a preset); its children carry mlflow.parentRunId
PARENT_ID_TAG = "mlflow.parentRunId"


def config_digest(params: Mapping[str, Any]) -> str:
    """A short, order-independent digest of a flat config: the same job rerun gets the same digest."""
    text = json.dumps({str(k): str(v) for k, v in params.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Outbox:
    """Where a job's calls go: its journal first (when it has one), then the store while the store answers.

    Past the retry budget the job goes offline: the calls only reach the journal, and `flush` replays the
    journal into the store when the job ends (or leaves it for `nern track sync`); it also does for a job that
    continues an earlier attempt's journal (that attempt may have ended offline). Without a journal an
    unavailable store is an error, as it always was.
    """

    def __init__(self, journal: str | os.PathLike | None, uri: str) -> None:
        self.journal = Journal(journal) if journal is not None else None
        self.uri = uri
        self.offline = False
        self.continued = False

    def begin(self, identity: dict[str, Any]) -> None:
        if self.journal is not None:
            self.continued = self.journal.begin(identity)

    def record(self, op: str, **fields: Any) -> None:
        if self.journal is not None:
            self.journal.append(op, **fields)

    def send(self, call: Callable[[], Any], what: str) -> None:
        if self.offline:
            return
        try:
            _retry(call, what)
        except StoreUnavailable as exc:
            self.go_offline(exc)

    def go_offline(self, exc: StoreUnavailable) -> None:
        if self.journal is None:
            raise exc
        if not self.offline:
            log.warning("%s; the job goes on and keeps what it logs in %s", exc, self.journal.path)
        self.offline = True

    def flush(self) -> str | None:
        """Replay the journal of an offline (or continued) job into the store; the run id, or None when the store
        is still away or there was nothing to replay."""
        if not (self.offline or self.continued) or self.journal is None:
            return None
        later = (f"{self.journal.path} keeps this job's run: send it with `nern track sync <results dir> "
                 f"--mlflow-uri {redact(self.uri)}`")
        if not store_reachable(self.uri):
            log.warning("MLflow store %s is still unreachable; %s", redact(self.uri), later)
            return None
        try:
            replayed = replay_journal(self.journal.path, self.uri)
        except Exception as exc:  # noqa: BLE001 - the job's results are safe on disk; a replay can wait
            log.warning("could not replay this job's journal (%s); %s", redact(str(exc)), later)
            return None
        if self.offline:
            log.warning("MLflow store %s is back: replayed this job's journal into run %s", redact(self.uri),
                        replayed.run_id if replayed else None)
        self.offline = False
        return replayed.run_id if replayed else None


class Tracker:
    """One MLflow run for the duration of a `with` block; every method is a no-op when tracking is off.

    A job's run is found again in the store, never in a file beside the outputs (see `find_job_run`), so a
    pipeline that is killed anywhere and rerun ends with one FINISHED run per job. `run_id` reopens a given
    run instead. On exit the run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C. With a `journal`
    (a file beside the job's outputs) every call is written there first, and a store that stays away does not
    stop the job (`_Outbox`).
    """

    def __init__(
        self, uri: str | None, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
        run_id: str | None = None, enabled: bool = True,
        *,
        results_dir: str | os.PathLike = "results",
        resume_key: str | None = None,
        digest: str | None = None,
        parent: str | None = None,
        system_metrics: bool = False,
        journal: str | os.PathLike | None = None,
    ) -> None:
        self.uri = default_tracking_uri(uri, results_dir) if enabled else DISABLED
        self.enabled = enabled and self.uri != DISABLED
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.run_id: str | None = run_id if self.enabled else None
        self.resumed = run_id is not None
        self.resume_key, self.digest = resume_key, digest
        self.tags.update({tag: value for tag, value in ((RESUME_TAG, resume_key), (CONFIG_TAG, digest)) if value})
        self.parent, self.system_metrics = parent, system_metrics
        self.results_dir = results_dir
        self.outbox = _Outbox(journal, self.uri)
        self._client: Any = None
        self._experiment_id: str | None = None
        self._params: dict[str, str] = {}
        self._monitor: Any = None
        self._started = False

    # -- lifecycle

    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self._end_quietly("KILLED")
        else:
            self._end_quietly("FAILED")

    def start(self) -> str | None:
        """Create (or reopen) the run; returns its id, None when tracking is off or the store is away."""
        if not self.enabled:
            return None
        try:
            _open_run(self)
        except StoreUnavailable as exc:
            self.outbox.go_offline(exc)
        tags = {"mlflow.user": _user(), **{k: v for k, v in self.tags.items() if k != PARENT_ID_TAG}}
        self.outbox.begin({"experiment": self.experiment, "run_name": self.run_name, "tags": tags,
                           "key": self.resume_key, "digest": self.digest, "parent": self.parent})
        self._started = True
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or not self._started:
            return
        self._started = False
        self.outbox.record("end", status=status, ts=now_ms())
        if not self.outbox.offline:
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None
            run_id, client = self.run_id, self._client
            self.outbox.send(lambda: client.set_terminated(run_id, status), f"mark run {run_id} {status}")
        self.run_id = self.outbox.flush() or self.run_id
        self._client = None

    def _end_quietly(self, status: str) -> None:
        """Ending a run while an exception propagates must not replace that exception."""
        try:
            self.end(status)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, redact(str(exc)))

    # -- logging

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log a flat mapping; values are stringified and cut to MLflow's limit; re-logging equal values is fine."""
        if not self._active():
            return
        from mlflow.entities import Param

        new = _params_to_log(self._params, flat, self.run_id)
        for batch in _chunks(list(new.items()), PARAMS_PER_BATCH):
            params = [Param(k, v) for k, v in batch]
            self.outbox.record("params", params=dict(batch))
            self.outbox.send(lambda: self._client.log_batch(self.run_id, params=params), "log params")
            self._params.update(batch)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at `step`; tensors and numpy scalars are converted, None is skipped."""
        if not self._active():
            return
        from mlflow.entities import Metric

        now = now_ms()
        values = {_key(k): float(v) for k, v in metrics.items() if v is not None}
        self.outbox.record("metrics", step=int(step), ts=now, metrics=values)
        entries = [Metric(k, v, now, int(step)) for k, v in values.items()]
        for batch in _chunks(entries, METRICS_PER_BATCH):
            self.outbox.send(lambda: self._client.log_batch(self.run_id, metrics=batch), f"log metrics at step {step}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._active():
            return
        values = {_key(k): _truncate(v, MAX_TAG_VALUE) for k, v in tags.items()}
        self.outbox.record("tags", tags=values)
        for batch in _chunks(list(values.items()), PARAMS_PER_BATCH):
            self.outbox.send(lambda: self._client.log_batch(self.run_id, tags=_run_tags(dict(batch))), "set tags")

    def log_dataset(self, name: str, source: str, digest: str, context: str) -> None:
        """Record a data set the job read (MLflow's Datasets column); `context` is training or evaluation."""
        if not self._active():
            return
        self.outbox.record("dataset", name=name, source=source, digest=digest, context=context)
        entry = _dataset_input(name, source, digest, context)
        self.outbox.send(lambda: self._client.log_inputs(self.run_id, datasets=[entry]), f"log dataset {name}")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or directory) into the run's artifact store."""
        if not self._active():
            return
        local = Path(path)
        if not local.exists():
            raise NernError(f"cannot log artifact {local}: it does not exist; run the stage that writes it")
        self.outbox.record("artifact", path=_journal_path(local, self.outbox.journal), artifact_path=artifact_path)
        self.outbox.send(lambda: _upload(self._client, self.run_id, local, artifact_path), f"log artifact {local}")

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if not self._started:
            raise RuntimeError("Tracker used outside its `with` block (call start() first)")
        return True


def _params_to_log(logged: Mapping[str, str], flat: Mapping[str, Any], run_id: str | None) -> dict[str, str]:
    """The params of `flat` not yet logged (MLflow keys and lengths); a changed value is refused, since MLflow
    cannot change a logged param."""
    new: dict[str, str] = {}
    for raw_key, raw_value in flat.items():
        key, value = _key(raw_key), _truncate(raw_value, MAX_PARAM_VALUE)
        old = logged.get(key, new.get(key))
        if old is None:
            new[key] = value
        elif old != value:
            raise NernError(f"MLflow run {run_id} already has param {key}={old!r}, not {value!r}; "
                            "resume with the original config or start a new run")
    return new


def _open_run(tr: Tracker) -> None:
    """Open the store, the parent run and the job's run (found again, or created) of a starting Tracker."""
    tr._client, tr._experiment_id = _open_store(tr.uri, tr.experiment)
    if tr.parent:
        tr.tags[PARENT_ID_TAG] = parent_run(tr._client, tr._experiment_id, tr.parent, tr.uri, tr.results_dir)
    if not tr.resumed and tr.resume_key:
        tr.run_id = find_job_run(tr._client, tr._experiment_id, tr.resume_key, tr.digest)
        tr.resumed = tr.run_id is not None
    if tr.resumed:
        tr._params = _reopen_run(tr._client, tr.run_id, tr.uri)
        tags = _run_tags({_key(k): _truncate(v, MAX_TAG_VALUE) for k, v in tr.tags.items()})
        _retry(lambda: tr._client.log_batch(tr.run_id, tags=tags), "set tags")
    else:
        tr.run_id = _create_run(tr._client, tr._experiment_id, tr.run_name, tr.tags,
                                twins=_job_twins(tr.resume_key, tr.digest))
    tr._monitor = _start_system_metrics(tr.run_id, tr.uri) if tr.system_metrics else None


def _run_tags(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _dataset_input(name: str, source: str, digest: str, context: str) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = "http" if "://" in source else "local"
    return DatasetInput(Dataset(name, digest, source_type, json.dumps({"uri": source})),
                        [InputTag("mlflow.data.context", context)])


def _upload(client: Any, run_id: str, local: Path, artifact_path: str | None) -> None:
    if local.is_dir():
        client.log_artifacts(run_id, str(local), artifact_path)
    else:
        client.log_artifact(run_id, str(local), artifact_path)


def _journal_path(local: Path, journal: Journal | None) -> str:
    """An output file as the journal names it: relative to the journal's directory when inside it, so a
    results tree that was moved or copied still finds its files."""
    if journal is not None:
        with contextlib.suppress(ValueError):
            return str(local.resolve().relative_to(journal.path.parent.resolve()))
    return str(local.resolve())


# ------------------------------------------------------------------------------------------ store calls


def find_job_run(client: Any, experiment_id: str, key: str, digest: str | None) -> str | None:
    """The run to reopen for the job `key` (its output directory) with config `digest`, None for a new run.

    The rule: the newest run tagged with this key and this digest is the job's run, whatever its status, so a
    rerun after a kill at any point lands in it: before the first checkpoint, mid-run, after the outputs but
    before FINISHED, and after FINISHED but before the process exited (snakemake reruns the job). A changed
    result-affecting config is another job: a new run, and the old job's unfinished runs of this key are
    marked KILLED (they will never finish: their outputs are being replaced). Without a digest a FINISHED run
    is never reopened (nothing tells a rerun of the job from a new one).
    """
    runs = _runs_of_job(client, experiment_id, key, digest)
    same = next((run for run in runs if run.data.tags.get(CONFIG_TAG) == digest), None)
    if same is not None and (digest is not None or same.info.status != "FINISHED"):
        return same.info.run_id
    for run in runs:
        if run.info.status in ("RUNNING", "SCHEDULED"):
            _retry(lambda: client.set_terminated(run.info.run_id, "KILLED"), f"close abandoned run {run.info.run_id}")
    return None


def _quoted_filter(tag: str, value: str) -> str | None:
    """`tags.<tag> = <value>` in whichever quotes MLflow's filter can take; None when it can take neither."""
    return next((f"tags.`{tag}` = {q}{value}{q}" for q in "'\"" if q not in value), None)


def parent_run(client: Any, experiment_id: str, name: str, uri: str,
               results_dir: str | os.PathLike | None = None) -> str:
    """The id of the parent run called `name`, created (FINISHED: it only groups) by the first job asking.
    Creation is serialised with a file lock (`_parent_lock`), so parallel jobs agree on one parent; where no
    lock exists, the oldest of any duplicates wins every later lookup."""
    query = _quoted_filter(PARENT_TAG, name) or f"tags.`{PARENT_TAG}` = '{name}'"

    def oldest() -> str | None:
        runs = _retry(lambda: client.search_runs([experiment_id], filter_string=query,
                                                 order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
                                                 max_results=1),
                      f"look for the parent run {name}")
        return runs[0].info.run_id if runs else None

    found = oldest()  # outside the lock: while the store is away, waiting jobs do not queue on it
    if found is not None:
        return found
    with _file_lock(_parent_lock(uri, results_dir)):
        found = oldest()
        if found is not None:
            return found
        run_id = _create_run(client, experiment_id, name, {PARENT_TAG: name, "nern.stage": "pipeline"},
                             twins=query)
        _retry(lambda: client.set_terminated(run_id, "FINISHED"), f"close the parent run {name}")
    return oldest() or run_id


def _start_system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's CPU/memory/disk sampler, logging into the job's run every 10 s until the run ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def _job_twins(key: str | None, digest: str | None) -> str | None:
    """The filter that finds the runs of one job (its key and digest), for `_create_run`'s twin check."""
    if not key or not digest:
        return None
    by_key, by_digest = _quoted_filter(RESUME_TAG, key), _quoted_filter(CONFIG_TAG, digest)
    return f"{by_key} and {by_digest}" if by_key and by_digest else None


def _runs_of_job(client: Any, experiment_id: str, key: str, digest: str | None) -> list[Any]:
    """Runs tagged with the job key, newest first (filtered on whichever tag MLflow's filter can quote)."""
    query = next((f for f in (_quoted_filter(RESUME_TAG, key), digest and _quoted_filter(CONFIG_TAG, digest)) if f),
                 None)
    if query is None:
        return []
    runs = _retry(lambda: client.search_runs([experiment_id], filter_string=query,
                                             order_by=["attributes.start_time DESC"], max_results=100),
                  f"look for the runs of {key}")
    return [run for run in runs if run.data.tags.get(RESUME_TAG) == key]


def _open_store(uri: str, experiment: str) -> tuple[Any, str]:
    """An MlflowClient and the experiment's id, the store initialised under the SQLite init lock."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise NernError("mlflow is not installed; `pip install mlflow` or set the tracking URI to none") from exc
    _quiet_lock_logs()
    with _store_init_lock(uri):
        client = _retry(lambda: MlflowClient(tracking_uri=uri), f"open MLflow store {redact(uri)}")
        experiment_id = _retry(lambda: _experiment_id(client, experiment, uri), "open the experiment")
    return client, experiment_id


def _experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another process won the race


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Beside the SQLite file, never the cwd; a server decides for itself."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / ARTIFACTS_DIR / _slug(experiment)).as_uri()


def _create_run(client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str],
                start_ms: int | None = None, twins: str | None = None) -> str:
    """Create a run; with `twins` (a filter matching the runs of the same job), delete the copies that a
    re-sent create request left: MLflow's HTTP client retries a POST whose answer was lost, and the server
    may have committed the first one. A twin has the same job tags and the same client-side start time."""
    tags = {"mlflow.user": _user(), **tags}
    start_ms = start_ms or now_ms()
    run = _retry(lambda: client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=run_name),
                 f"create run {run_name}")
    run_id = run.info.run_id
    if twins:
        query = f"{twins} and attributes.start_time = {start_ms}"
        found = _retry(lambda: client.search_runs([experiment_id], filter_string=query, max_results=100),
                       f"look for twins of run {run_name}")
        for twin in (r.info.run_id for r in found if r.info.run_id != run_id):
            _retry(lambda: client.delete_run(twin), f"delete the twin run {twin}")
            log.warning("deleted run %s, a twin of %s left by a re-sent create request", twin, run_id)
    return run_id


def _reopen_run(client: Any, run_id: str, uri: str) -> dict[str, str]:
    """Mark the run RUNNING again; returns its logged params (so a changed value is refused, not logged)."""
    from mlflow.exceptions import MlflowException

    try:
        run = _retry(lambda: client.get_run(run_id), f"find run {run_id}")
    except MlflowException as exc:
        raise NernError(
            f"MLflow run {run_id} is not in {redact(uri)}; use the store the run was started with "
            "or drop the run id to start a new run"
        ) from exc
    _retry(lambda: client.update_run(run_id, status="RUNNING"), f"reopen run {run_id}")
    return dict(run.data.params)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ------------------------------------------------------------------------------------------ replay and sync


@dataclass
class Replayed:
    """What replaying one job's journal did to the store."""

    journal: Path
    run_id: str
    created: bool
    status: str | None  # the status the run ended with; None: the journal has no end (the job never ended)
    sent: dict[str, int] = field(default_factory=dict)  # params, tags, metrics, datasets, artifacts


def replay_journal(path: str | os.PathLike, uri: str, stores: dict[str, tuple[Any, str]] | None = None
                   ) -> Replayed | None:
    """Make the store hold everything the job's journal holds, sending only what it lacks: its run (found by
    the job's output directory and config digest, else created under its parent), params, tags, metric points
    (one per key and step), dataset inputs, artifacts (by name and size) and final status. Idempotent: a
    second replay sends nothing. None for a journal without a start. `stores` caches opened experiments."""
    records = Journal(path).records()
    start = next((r for r in reversed(records) if r["op"] == "start"), None)
    if start is None:
        return None
    experiment = start["experiment"]
    stores = {} if stores is None else stores
    if experiment not in stores:
        stores[experiment] = _open_store(uri, experiment)
    client, experiment_id = stores[experiment]
    tags = dict(start.get("tags") or {})
    if start.get("parent"):
        tags[PARENT_ID_TAG] = parent_run(client, experiment_id, start["parent"], uri)
    run_id, created = _replay_target(client, experiment_id, start, tags, records)
    run = _retry(lambda: client.get_run(run_id), f"read run {run_id}")
    sent = {"params": _replay_params(client, run, records), "tags": _replay_tags(client, run, tags, records),
            "metrics": _replay_metrics(client, run, records), "datasets": _replay_datasets(client, run, records),
            "artifacts": _replay_artifacts(client, run, records, Path(path).parent)}
    status = _replay_end(client, run, records)
    return Replayed(Path(path), run_id, created, status, sent)


def _replay_target(client: Any, experiment_id: str, start: dict[str, Any], tags: dict[str, str],
                   records: list[dict[str, Any]]) -> tuple[str, bool]:
    """The job's run in this store (the newest with its key and digest, whatever its status), else a new one
    started when the job started."""
    key, digest = start.get("key"), start.get("digest")
    if key:
        runs = _runs_of_job(client, experiment_id, key, digest)
        same = next((r for r in runs if r.data.tags.get(CONFIG_TAG) == digest), None)
        if same is not None:
            return same.info.run_id, False
    first = next(r for r in records if r["op"] == "start")
    run_id = _create_run(client, experiment_id, start["run_name"], tags, start_ms=first.get("ts"),
                         twins=_job_twins(key, digest))
    return run_id, True


def _replay_params(client: Any, run: Any, records: list[dict[str, Any]]) -> int:
    """Params the run lacks (the first value logged wins; a key the run has keeps its value)."""
    from mlflow.entities import Param

    wanted: dict[str, str] = {}
    for record in iter_ops(records, "params"):
        for key, value in record["params"].items():
            wanted.setdefault(key, value)
    new = [Param(k, v) for k, v in wanted.items() if k not in run.data.params]
    for batch in _chunks(new, PARAMS_PER_BATCH):
        _retry(lambda: client.log_batch(run.info.run_id, params=batch), "replay params")
    return len(new)


def _replay_tags(client: Any, run: Any, tags: dict[str, str], records: list[dict[str, Any]]) -> int:
    wanted = dict(tags)
    for record in iter_ops(records, "tags"):
        wanted.update(record["tags"])
    new = {k: v for k, v in wanted.items() if run.data.tags.get(k) != v}
    for batch in _chunks(list(new.items()), PARAMS_PER_BATCH):
        _retry(lambda: client.log_batch(run.info.run_id, tags=_run_tags(dict(batch))), "replay tags")
    return len(new)


def _replay_metrics(client: Any, run: Any, records: list[dict[str, Any]]) -> int:
    """Metric points the run lacks. A point is its key, step, timestamp and value, so a point the job logged
    twice (at two moments) stays two points, as the store had it live, and a replay never adds one twice."""
    from mlflow.entities import Metric

    points = _journal_points(records)
    have: set[tuple[str, int, int, Any]] = set()
    for key in sorted({p[0] for p in points} & set(run.data.metrics)):
        history = _retry(lambda: client.get_metric_history(run.info.run_id, key), f"read metric {key}")
        have |= {_point(key, m.step, m.timestamp, m.value) for m in history}
    new = [Metric(key, float(value), ts, step) for key, step, ts, value in points if (key, step, ts, value) not in have]
    for batch in _chunks(new, METRICS_PER_BATCH):
        _retry(lambda: client.log_batch(run.info.run_id, metrics=batch), "replay metrics")
    return len(new)


def _journal_points(records: list[dict[str, Any]]) -> list[tuple[str, int, int, Any]]:
    """Every metric point of the journal; a (key, step) that a later attempt logged again (a resumed job
    recomputes the steps after its last checkpoint) is taken from that attempt only."""
    attempt, by_step = 0, {}
    for record in records:
        attempt += record["op"] == "start"
        if record["op"] == "metrics":
            for key, value in record["metrics"].items():
                point = _point(key, record["step"], record["ts"], value)
                by_step.setdefault(point[:2], []).append((attempt, point))
    latest = (max(a for a, _ in entries) for entries in by_step.values())
    return list(dict.fromkeys(p for entries, last in zip(by_step.values(), latest) for a, p in entries if a == last))


def _point(key: str, step: Any, ts: Any, value: Any) -> tuple[str, int, int, Any]:
    value = float(value)
    return key, int(step), int(ts), "nan" if math.isnan(value) else value


def _replay_datasets(client: Any, run: Any, records: list[dict[str, Any]]) -> int:
    have = {(d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}.get("mlflow.data.context"))
            for d in (run.inputs.dataset_inputs if run.inputs else [])}
    sent = 0
    for record in iter_ops(records, "dataset"):
        ident = (record["name"], record["digest"], record["context"])
        if ident in have:
            continue
        entry = _dataset_input(record["name"], record["source"], record["digest"], record["context"])
        _retry(lambda: client.log_inputs(run.info.run_id, datasets=[entry]), f"replay dataset {record['name']}")
        have.add(ident)
        sent += 1
    return sent


def _replay_artifacts(client: Any, run: Any, records: list[dict[str, Any]], base: Path) -> int:
    """Output files the run's artifact store lacks (or holds at another size); a file gone from disk is
    skipped with a warning: the journal cannot bring it back."""
    wanted = {(r["path"], r.get("artifact_path")): None for r in iter_ops(records, "artifact")}
    sent = 0
    for name, artifact_path in wanted:
        local = base / name
        if not local.exists():
            log.warning("%s is gone; not logged to run %s", local, run.info.run_id)
            continue
        listed = _retry(lambda: client.list_artifacts(run.info.run_id, artifact_path), "list artifacts")
        sizes = {Path(a.path).name: a.file_size for a in listed}
        if local.is_file() and sizes.get(local.name) == local.stat().st_size:
            continue
        _retry(lambda: _upload(client, run.info.run_id, local, artifact_path), f"replay artifact {local}")
        sent += 1
    return sent


def _replay_end(client: Any, run: Any, records: list[dict[str, Any]]) -> str | None:
    """The final status, when the job's last attempt ended (its `end` comes after its last `start`)."""
    last = next((r for r in reversed(records) if r["op"] in ("start", "end")), None)
    if last is None or last["op"] != "end":
        return None
    status = last["status"]
    if run.info.status != status:
        _retry(lambda: client.set_terminated(run.info.run_id, status, end_time=last.get("ts")),
               f"mark run {run.info.run_id} {status}")
    return status


def sync_results(results_dir: str | os.PathLike, uri: str) -> list[Replayed]:
    """Replay every job journal below `results_dir` into the store at `uri` (`nern track sync`)."""
    journals = find_journals(results_dir)
    if not journals:
        raise NernError(f"no {JOURNAL_NAME} below {results_dir}; point nern track sync at a results directory "
                        "written by tracked jobs (tracking on)")
    stores: dict[str, tuple[Any, str]] = {}
    return [done for path in journals if (done := replay_journal(path, uri, stores)) is not None]


def backfill_journals(results_dir: str | os.PathLike) -> int:
    """Write a journal for every job that the results directory's own store (its mlflow.db) holds but whose
    output directory has none (runs logged before jobs kept journals), so that `sync_results` moves them too;
    returns how many. A tree that was copied elsewhere finds its jobs by their path below the results
    directory the store was written in (where its artifacts went)."""
    root = Path(results_dir)
    if not (root / DB_NAME).is_file():
        return 0
    client, _ = _open_store(default_uri(root), "Default")
    written = 0
    for experiment in _retry(lambda: client.search_experiments(), "list the experiments"):
        old_root = _store_root(experiment.artifact_location)
        runs = _retry(lambda: client.search_runs([experiment.experiment_id], max_results=50_000), "list runs")
        for run in runs:
            out = _job_dir(run.data.tags.get(RESUME_TAG), old_root, root)
            if out is not None and not (out / JOURNAL_NAME).exists():
                _export_run(client, run, experiment.name, out)
                written += 1
    return written


def _store_root(artifact_location: str | None) -> Path | None:
    """The results directory an embedded store was written in: where its artifacts went (`_artifact_location`)."""
    path = Path(urllib.parse.urlsplit(artifact_location or "").path)
    return path.parents[1] if len(path.parents) > 1 and path.parent.name == ARTIFACTS_DIR else None


def _job_dir(key: str | None, old_root: Path | None, root: Path) -> Path | None:
    """The job's output directory below `root`: where it ran, or its place in the copied tree."""
    if not key:
        return None
    ran_in = Path(key)
    if ran_in.is_dir() and ran_in.resolve().is_relative_to(root.resolve()):
        return ran_in
    if old_root is not None and ran_in.is_relative_to(old_root) and (root / ran_in.relative_to(old_root)).is_dir():
        return root / ran_in.relative_to(old_root)
    return None


def _export_run(client: Any, run: Any, experiment: str, out: Path) -> None:
    """The journal the job would have written, from its run: identity, params, every metric point, dataset
    inputs, the output files the run holds that are still beside it, and how it ended."""
    journal, data, run_id = Journal(out / JOURNAL_NAME), run.data, run.info.run_id
    parent_id = data.tags.get(PARENT_ID_TAG)
    parent = None
    if parent_id:
        parent = _retry(lambda: client.get_run(parent_id), "read the parent run").data.tags.get(PARENT_TAG)
    tags = {k: v for k, v in data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.user"}
    journal.append("start", v=JOURNAL_VERSION, ts=run.info.start_time, experiment=experiment,
                   run_name=run.info.run_name, tags=tags, key=data.tags.get(RESUME_TAG),
                   digest=data.tags.get(CONFIG_TAG), parent=parent)
    if data.params:
        journal.append("params", params=dict(data.params))
    for key in sorted(data.metrics):
        for m in _retry(lambda: client.get_metric_history(run_id, key), f"read metric {key}"):
            journal.append("metrics", step=m.step, ts=m.timestamp, metrics={key: m.value})
    for entry in run.inputs.dataset_inputs if run.inputs else []:
        source = json.loads(entry.dataset.source or "{}").get("uri", entry.dataset.source)
        context = {t.key: t.value for t in entry.tags}.get("mlflow.data.context")
        journal.append("dataset", name=entry.dataset.name, source=source, digest=entry.dataset.digest,
                       context=context)
    for artifact in _retry(lambda: client.list_artifacts(run_id), "list artifacts"):
        if not artifact.is_dir and (out / artifact.path).is_file():
            journal.append("artifact", path=artifact.path, artifact_path=None)
    if run.info.status not in ("RUNNING", "SCHEDULED"):
        journal.append("end", status=run.info.status, ts=run.info.end_time)
