"""MLflow tracking for the long-running stages: one stage (fit, pretrain) = one MLflow run.

The default store is an embedded SQLite file, `sqlite:///<results>/mlflow.db`, so a user needs no server;
an `http(s)://` URI switches to a tracking server, `none` switches tracking off. Parallel pipeline jobs write
to the same SQLite file at once, so:

- the first use of a fresh store (MLflow creates its tables then) is serialised with a file lock next to
  the database: MLflow 3.17 runs its schema migrations unguarded, and 8 processes opening a fresh store at
  once fail with "table ... already exists" / "duplicate column" and can leave a half-migrated schema;
- every MLflow call goes through `_retry`, which retries transient failures ("database is locked",
  `OperationalError`, `TEMPORARILY_UNAVAILABLE`) with exponential backoff and jitter for up to 120 s;
- two processes creating the same experiment race; the loser re-fetches it by name.

MLflow is imported lazily: `import nern` must stay fast and work without it when tracking is off.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from nern.errors import NernError

T = TypeVar("T")

DISABLED = "none"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RETRY_BUDGET_S = 120.0

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


# ---------------------------------------------------------------------------------------------- URIs


def default_uri(results_dir: str | os.PathLike) -> str:
    """The embedded store of a results directory; absolute, so jobs started elsewhere agree on it."""
    return f"sqlite:///{Path(results_dir).resolve() / DB_NAME}"


def resolve_uri(uri: str | None, results_dir: str | os.PathLike = "results") -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the results directory's SQLite file."""
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
    if not uri:
        return default_uri(results_dir)
    if uri.lower() == DISABLED:
        return DISABLED
    if "://" not in uri and not uri.startswith("sqlite:"):
        raise NernError(
            f"tracking URI {uri!r} has no scheme; use sqlite:///<abs path>/mlflow.db, http://host:port or none"
        )
    if uri.startswith("sqlite:///"):
        return _absolute_sqlite(uri)
    return uri


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


# ----------------------------------------------------------------------------------------- retrying


def _is_transient(exc: BaseException) -> bool:
    """Lock contention and MLflow's TEMPORARILY_UNAVAILABLE are worth waiting for; schema errors are not."""
    text = str(exc).lower()
    if any(marker in text for marker in _PERMANENT_MARKERS):
        return False
    if "database is locked" in text or "database table is locked" in text or "busy" in text:
        return True
    if getattr(exc, "error_code", None) == "TEMPORARILY_UNAVAILABLE":
        return True
    return type(exc).__name__ == "OperationalError"  # sqlite3's and SQLAlchemy's


def _retry(call: Callable[[], T], what: str, budget_s: float = RETRY_BUDGET_S) -> T:
    """Run `call`, retrying transient store errors with exponential backoff and full jitter."""
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            delay = random.uniform(0.5, 1.5) * min(5.0, 0.05 * 2**attempt)
            if time.monotonic() + delay > deadline:
                raise NernError(
                    f"MLflow store stayed unavailable for {budget_s:.0f} s while trying to {what} ({exc}); "
                    "run fewer jobs in parallel or use a tracking server (tracking URI http://host:port)"
                ) from exc
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
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across processes (MLflow's table creation is not race-safe)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


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


RESUME_TAG = "nern.out"


class Tracker:
    """One MLflow run for the duration of a `with` block; every method is a no-op when tracking is off.

    `run_id` resumes an existing run, so a fit that crashed and resumed from its checkpoint stays one run.
    On exit the run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        *,
        results_dir: str | os.PathLike = "results",
        resume_key: str | None = None,
    ) -> None:
        self.uri = resolve_uri(uri, results_dir) if enabled else DISABLED
        self.enabled = enabled and self.uri != DISABLED
        self.experiment = experiment
        self.run_name = run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.run_id: str | None = run_id if self.enabled else None
        self._resume = run_id is not None
        # An unfinished run tagged with this key (e.g. the output directory) is reopened rather than a second
        # run created: a job killed between creating its run and saving the run id still stays one run.
        self.resume_key = resume_key
        if resume_key:
            self.tags[RESUME_TAG] = resume_key
        self._client: Any = None
        self._experiment_id: str | None = None
        self._params: dict[str, str] = {}

    # -- lifecycle

    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self._end_quietly("KILLED")
        else:
            self._end_quietly("FAILED")

    def start(self) -> str | None:
        """Create (or reopen) the run; returns its id, None when tracking is off."""
        if not self.enabled:
            return None
        self._client = self._open_client()
        if not self._resume and self.resume_key:
            self.run_id = self._unfinished_run(self.resume_key)
            self._resume = self.run_id is not None
        if self._resume:
            self._reopen_run()
        else:
            self._create_run()
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self._client is None or self.run_id is None:
            return
        run_id, client = self.run_id, self._client
        _retry(lambda: client.set_terminated(run_id, status), f"mark run {run_id} {status}")
        self._client = None

    def _end_quietly(self, status: str) -> None:
        """Ending a run while an exception propagates must not replace that exception."""
        try:
            self.end(status)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", self.run_id, status, exc)

    # -- logging

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log a flat mapping; values are stringified and cut to MLflow's limit; re-logging equal values is fine."""
        if not self._active():
            return
        from mlflow.entities import Param

        new: dict[str, str] = {}
        for raw_key, raw_value in flat.items():
            key, value = _key(raw_key), _truncate(raw_value, MAX_PARAM_VALUE)
            old = self._params.get(key, new.get(key))
            if old is None:
                new[key] = value
            elif old != value:
                raise NernError(
                    f"MLflow run {self.run_id} already has param {key}={old!r}, not {value!r}; "
                    "resume with the original config or start a new run"
                )
        for batch in _chunks(list(new.items()), PARAMS_PER_BATCH):
            params = [Param(k, v) for k, v in batch]
            _retry(lambda: self._client.log_batch(self.run_id, params=params), "log params")
            self._params.update(batch)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at `step`; tensors and numpy scalars are converted, None is skipped."""
        if not self._active():
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(_key(k), float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        for batch in _chunks(entries, METRICS_PER_BATCH):
            _retry(lambda: self._client.log_batch(self.run_id, metrics=batch), f"log metrics at step {step}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._active():
            return
        from mlflow.entities import RunTag

        entries = [RunTag(_key(k), _truncate(v, MAX_TAG_VALUE)) for k, v in tags.items()]
        for batch in _chunks(entries, PARAMS_PER_BATCH):
            _retry(lambda: self._client.log_batch(self.run_id, tags=batch), "set tags")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or directory) into the run's artifact store."""
        if not self._active():
            return
        local = Path(path)
        if not local.exists():
            raise NernError(f"cannot log artifact {local}: it does not exist; run the stage that writes it")
        if local.is_dir():
            call = lambda: self._client.log_artifacts(self.run_id, str(local), artifact_path)  # noqa: E731
        else:
            call = lambda: self._client.log_artifact(self.run_id, str(local), artifact_path)  # noqa: E731
        _retry(call, f"log artifact {local}")

    # -- internals

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self._client is None or self.run_id is None:
            raise RuntimeError("Tracker used outside its `with` block (call start() first)")
        return True

    def _open_client(self) -> Any:
        """An MlflowClient whose store is initialised (under the SQLite init lock)."""
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise NernError("mlflow is not installed; `pip install mlflow` or set the tracking URI to none") from exc
        _quiet_lock_logs()
        with _store_init_lock(self.uri):
            client = _retry(lambda: MlflowClient(tracking_uri=self.uri), f"open MLflow store {self.uri}")
            self._experiment_id = _retry(lambda: self._get_or_create_experiment(client), "open the experiment")
        return client

    def _get_or_create_experiment(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self._artifact_location())
        except MlflowException as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(self.experiment).experiment_id  # another process won the race

    def _artifact_location(self) -> str | None:
        """Beside the SQLite file, never the cwd; a server decides for itself."""
        db = sqlite_path(self.uri)
        if db is None:
            return None
        return (db.parent / ARTIFACTS_DIR / _slug(self.experiment)).as_uri()

    def _unfinished_run(self, key: str) -> str | None:
        quote = next((q for q in "'\"" if q not in key), None)
        if quote is None:  # MLflow's filter language cannot quote it; the run-id file still covers resumes
            return None
        query = f"tags.`{RESUME_TAG}` = {quote}{key}{quote} and attributes.status != 'FINISHED'"
        runs = _retry(lambda: self._client.search_runs([self._experiment_id], filter_string=query,
                                                       order_by=["attributes.start_time DESC"], max_results=1),
                      f"look for an unfinished run of {key}")
        return runs[0].info.run_id if runs else None

    def _create_run(self) -> None:
        tags = {"mlflow.user": _user(), **self.tags}
        run = _retry(
            lambda: self._client.create_run(self._experiment_id, run_name=self.run_name, tags=tags),
            f"create run {self.run_name}",
        )
        self.run_id = run.info.run_id

    def _reopen_run(self) -> None:
        from mlflow.exceptions import MlflowException

        run_id = self.run_id
        try:
            run = _retry(lambda: self._client.get_run(run_id), f"find run {run_id}")
        except MlflowException as exc:
            raise NernError(
                f"MLflow run {run_id} is not in {self.uri}; use the store the run was started with "
                "or drop the run id to start a new run"
            ) from exc
        self._params = dict(run.data.params)
        _retry(lambda: self._client.update_run(run_id, status="RUNNING"), f"reopen run {run_id}")
        if self.tags:
            self.set_tags(self.tags)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
