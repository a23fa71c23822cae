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
  `OperationalError`, `TEMPORARILY_UNAVAILABLE`) with exponential backoff and jitter for up to 120 s;
- two processes creating the same experiment race; the loser re-fetches it by name.

Runs are grouped: a job given a parent name (the pipeline passes its preset) becomes a child run
(`mlflow.parentRunId`) of the one run tagged `nern.parent=<name>`, created by the first job that needs it, so
the MLflow UI shows one expandable row per preset. Each job logs the data set it read as an MLflow dataset
input (name, source, digest), and can log system metrics (CPU, memory) while it runs.

MLflow is imported lazily: `import nern` must stay fast and work without it when tracking is off.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
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


RESUME_TAG = "nern.out"  # the job's key: its output directory
CONFIG_TAG = "nern.config"  # digest of the job's result-affecting config
PARENT_TAG = "nern.parent"  # the name of a parent run (a preset); its children carry mlflow.parentRunId


def config_digest(params: Mapping[str, Any]) -> str:
    """A short, order-independent digest of a flat config: the same job rerun gets the same digest."""
    text = json.dumps({str(k): str(v) for k, v in params.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Tracker:
    """One MLflow run for the duration of a `with` block; every method is a no-op when tracking is off.

    A job's run is found again in the store, never in a file beside the outputs (see `find_job_run`), so a
    pipeline that is killed anywhere and rerun ends with one FINISHED run per job. `run_id` reopens a given
    run instead. On exit the run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C.
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
        digest: str | None = None,
        parent: str | None = None,
        system_metrics: bool = False,
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
        self._client: Any = None
        self._experiment_id: str | None = None
        self._params: dict[str, str] = {}
        self._monitor: Any = None

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
        """Create (or reopen) the run; returns its id, None when tracking is off."""
        if not self.enabled:
            return None
        self._client, self._experiment_id = _open_store(self.uri, self.experiment)
        if self.parent:
            self.tags["mlflow.parentRunId"] = parent_run(self._client, self._experiment_id, self.parent, self.uri)
        if not self.resumed and self.resume_key:
            self.run_id = find_job_run(self._client, self._experiment_id, self.resume_key, self.digest)
            self.resumed = self.run_id is not None
        if self.resumed:
            self._params = _reopen_run(self._client, self.run_id, self.uri)
            self.set_tags(self.tags)
        else:
            self.run_id = _create_run(self._client, self._experiment_id, self.run_name, self.tags)
        self._monitor = _start_system_metrics(self.run_id, self.uri) if self.system_metrics else None
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self._client is None or self.run_id is None:
            return
        run_id, client = self.run_id, self._client
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
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

        new = _params_to_log(self._params, flat, self.run_id)
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

    def log_dataset(self, name: str, source: str, digest: str, context: str) -> None:
        """Record a data set the job read (MLflow's Datasets column); `context` is training or evaluation."""
        if not self._active():
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source_type = "http" if "://" in source else "local"
        entry = DatasetInput(Dataset(name, digest, source_type, json.dumps({"uri": source})),
                             [InputTag("mlflow.data.context", context)])
        _retry(lambda: self._client.log_inputs(self.run_id, datasets=[entry]), f"log dataset {name}")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or directory) into the run's artifact store."""
        if not self._active():
            return
        local = Path(path)
        if not local.exists():
            raise NernError(f"cannot log artifact {local}: it does not exist; run the stage that writes it")
        log = self._client.log_artifacts if local.is_dir() else self._client.log_artifact
        _retry(lambda: log(self.run_id, str(local), artifact_path), f"log artifact {local}")

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self._client is None or self.run_id is None:
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


def parent_run(client: Any, experiment_id: str, name: str, uri: str) -> str:
    """The id of the parent run called `name`, created (FINISHED: it only groups) by the first job asking.
    Creation is serialised with the store's init lock, so parallel jobs agree on one parent; where no lock
    exists (a server), the oldest of any duplicates wins every later lookup."""
    query = f"tags.`{PARENT_TAG}` = '{name}'" if "'" not in name else f'tags.`{PARENT_TAG}` = "{name}"'

    def oldest() -> str | None:
        runs = _retry(lambda: client.search_runs([experiment_id], filter_string=query,
                                                 order_by=["attributes.start_time ASC"], max_results=1),
                      f"look for the parent run {name}")
        return runs[0].info.run_id if runs else None

    with _store_init_lock(uri):
        found = oldest()
        if found is not None:
            return found
        run_id = _create_run(client, experiment_id, name, {PARENT_TAG: name, "nern.stage": "pipeline"})
        _retry(lambda: client.set_terminated(run_id, "FINISHED"), f"close the parent run {name}")
    return oldest() or run_id


def _start_system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's CPU/memory/disk sampler, logging into the job's run every 10 s until the run ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def _runs_of_job(client: Any, experiment_id: str, key: str, digest: str | None) -> list[Any]:
    """Runs tagged with the job key, newest first (filtered on whichever tag MLflow's filter can quote)."""
    query = next((f"tags.`{tag}` = {quote}{value}{quote}" for tag, value in ((RESUME_TAG, key), (CONFIG_TAG, digest))
                  if value for quote in "'\"" if quote not in value), None)
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
        client = _retry(lambda: MlflowClient(tracking_uri=uri), f"open MLflow store {uri}")
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


def _create_run(client: Any, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
    tags = {"mlflow.user": _user(), **tags}
    run = _retry(lambda: client.create_run(experiment_id, run_name=run_name, tags=tags), f"create run {run_name}")
    return run.info.run_id


def _reopen_run(client: Any, run_id: str, uri: str) -> dict[str, str]:
    """Mark the run RUNNING again; returns its logged params (so a changed value is refused, not logged)."""
    from mlflow.exceptions import MlflowException

    try:
        run = _retry(lambda: client.get_run(run_id), f"find run {run_id}")
    except MlflowException as exc:
        raise NernError(
            f"MLflow run {run_id} is not in {uri}; use the store the run was started with "
            "or drop the run id to start a new run"
        ) from exc
    _retry(lambda: client.update_run(run_id, status="RUNNING"), f"reopen run {run_id}")
    return dict(run.data.params)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
