"""MLflow as a lab runs it: the pipeline against a real `mlflow server`, the server SIGKILLed and restarted
mid-pipeline, basic authentication, `nern track sync`, and 16 jobs logging to one server at once.

The server tests start their own servers (tests/mlflow_server.py, fixtures in tests/conftest.py) and skip,
naming the cause, where `mlflow server` cannot start. MLflow's own HTTP retries are shrunk here
(mlflow_server.CLIENT_RETRIES: 2 retries, about 2 s of backoff per call instead of about 250 s) and so is
nern's (NERN_MLFLOW_RETRY_S: RETRY_S below), so that an outage outlasts both in seconds: a restart alone takes
about 10 s. The 16 concurrent writers get a budget longer than their outage, so their retries ride it out.
NERN_SERVER_CHAOS_SEED picks other kill moments and outage lengths.

The fast tests (no server process) check what decides the behaviour: which errors are transient, the
credentials check, MLflow's client budget (measured against a closed port), the journal of a job whose store
is away and its replay by `nern track sync`, twin runs, and a results tree moved between two stores.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

import faults
from mlflow_server import CLIENT_RETRIES, MlflowServer, free_port
from test_chaos import metrics_results, nern_jobs, tables
from test_workflow import REPO, SNAKEFILE, TRACKED_RULES, job_counts, one_chain_config

from nern import tracking
from nern.cli import main as nern_main
from nern.errors import NernError
from nern.journal import JOURNAL_NAME, Journal
from nern.tracking import Tracker

pytest.importorskip("mlflow")

SEED = int(os.environ.get("NERN_SERVER_CHAOS_SEED", "7"))
# nern's retry budget in the pipeline run: below what a restart takes (~10 s), so every job that needs the
# store during an outage goes offline and keeps its journal; the 16 writers get a budget that outlasts a short
# outage, so their retries ride it out.
RETRY_S, LOAD_RETRY_S = 8.0, 45.0
SHORT_DOWN_S = (0.5, 1.5)  # seconds the server stays dead before the restart (which takes ~10 s more)
LONG_DOWN_S = (10.0, 13.0)  # longer than RETRY_S without the restart
RUN_TIMEOUT_S = 1500


# ------------------------------------------------------------------------------------------------ helpers


def server_env(server: MlflowServer, password: str | None = None, retry_s: float = RETRY_S) -> dict[str, str]:
    """The environment of a pipeline (or a sync) logging to `server`: shrunk retries, credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "NERN_MLFLOW"))}
    return {**env, **server.client_env(password), tracking.RETRY_ENV: str(retry_s), "PYTHONUNBUFFERED": "1"}


def server_config(path: Path, uri: str) -> Path:
    """The tiny preset trimmed to what the server tests need: pretrain, two permutations and two fits in
    parallel (3 tracked jobs), the tables; tracking to `uri`."""
    config = one_chain_config()
    network = config["networks"][0]
    network["grid"]["permutations"] = ["none", "crossfilter"]
    network.pop("data_free", None)
    config["applications"] = "none"
    config["mlflow"] = {**(config.get("mlflow") or {}), "tracking_uri": uri}
    path.write_text(yaml.safe_dump(config))
    return path


def start_pipeline(workdir: Path, configfile: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    command = ["timeout", "-s", "INT", "-k", "30", str(RUN_TIMEOUT_S), sys.executable, "-m", "snakemake", "all",
               "--snakefile", str(SNAKEFILE), "--directory", str(workdir), "--configfile", str(configfile),
               "--profile", str(REPO / "workflow" / "profiles" / "local"), *extra]
    log = open(workdir / f"snakemake-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)


def pipeline_output(workdir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(workdir.glob("snakemake-*.log")))


def sync(results: Path, uri: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nern", "track", "sync", str(results), "--mlflow-uri", uri],
                          capture_output=True, text=True, env=env, timeout=600)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def client_env(env: dict[str, str]) -> Iterator[None]:
    """Credentials (and retries) for this process's own MLflow client, restored afterwards."""
    keys = [k for k in env if k.startswith(("MLFLOW_", "NERN_"))]
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class JobRun:
    """What the store holds for one job: its run, and each metric's steps and number of points."""

    rule: str
    name: str
    status: str
    params: dict[str, str]
    steps: dict[str, list[int]]
    datasets: list[tuple[str, str]]


def store_jobs(uri: str, experiment: str) -> tuple[list[JobRun], int]:
    """Every job run of `experiment` (checked: one FINISHED parent, every job its child), sorted, and the
    number of runs in it."""
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    runs = mlflow_client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", f"{len(parents)} parent runs"
    jobs = []
    for run in runs:
        if run in parents:
            continue
        assert run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id, "a job outside the parent"
        steps = {key: sorted(m.step for m in mlflow_client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}
        datasets = sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs)
        jobs.append(JobRun(run.data.tags.get("rule", "?"), run.info.run_name, run.info.status,
                           dict(run.data.params), steps, datasets))
    return sorted(jobs, key=lambda j: (j.rule, j.name)), len(runs)


def check_one_finished_run_per_job(jobs: list[JobRun], counts: dict[str, int]) -> None:
    tracked = sum(counts.get(rule, 0) for rule in TRACKED_RULES)
    assert [j.status for j in jobs] == ["FINISHED"] * tracked, [(j.name, j.status) for j in jobs]
    assert len({(j.rule, j.name) for j in jobs}) == tracked, "not one run per job"
    for job in jobs:
        assert job.datasets, f"{job.name}: no dataset input"
        assert job.params and job.steps, f"{job.name}: no params or metrics"


def same_runs(got: list[JobRun], want: list[JobRun]) -> None:
    """The same jobs with the same params, datasets and, per metric, the same steps (curves included), each
    as often: none lost, none duplicated (a job may log a point twice, e.g. pretrain's last val_top1)."""
    assert [(j.rule, j.name) for j in got] == [(j.rule, j.name) for j in want]
    for mine, theirs in zip(got, want):
        assert mine.params == theirs.params, mine.name
        assert mine.datasets == theirs.datasets, mine.name
        assert mine.steps == theirs.steps, mine.name


def all_files(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
        yield from (p for p in root.rglob("*") if p.is_file())


def secret_forms(secret: str) -> list[bytes]:
    """The secret as it would appear in a file: as is, and inside base64 (the report embeds files so) at each
    of the three alignments (the part of the encoding that does not depend on the neighbours)."""
    raw = secret.encode()
    forms = [raw]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw + b"\0" * 3)
        forms.append(encoded[4 : 4 * ((pad + len(raw)) // 3)])
    return [f for f in forms if len(f) >= 8]


def files_with(secret: str, *roots: Path) -> list[str]:
    forms = secret_forms(secret)
    return [str(p) for p in all_files(*roots) if any(form in p.read_bytes() for form in forms)]


# ------------------------------------------------------------------------------------------------ fast tests


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status in the server's `status` (a proxy's plain-text error page)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"upstream says no")

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def stub_server(status: int) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.status = status
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def rude_server(mode: str) -> Iterator[str]:
    """A socket that accepts and then closes at once ("reset") or never answers ("silent")."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                if mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    conn.close()
                else:
                    held.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def store_error(uri: str) -> Exception:
    """The exception MLflow's client raises for one call to `uri` (no HTTP retries)."""
    try:
        client(uri).get_experiment_by_name("anything")
    except Exception as exc:  # noqa: BLE001 - the exception is the result
        return exc
    raise AssertionError(f"{uri} answered")


@pytest.fixture
def no_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI", "NERN_MLFLOW_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_and_unavailable_answers_are_transient(no_client_retries, status):
    with stub_server(status) as uri:
        exc = store_error(uri)
    assert tracking._is_transient(exc), exc
    assert tracking._auth_status(exc) is None


@pytest.mark.parametrize("mode", ["refused", "reset", "silent"])
def test_refused_reset_and_timed_out_connections_are_transient(no_client_retries, mode):
    if mode == "refused":
        exc = store_error(f"http://127.0.0.1:{free_port()}")
    else:
        with rude_server(mode) as uri:
            exc = store_error(uri)
    assert tracking._is_transient(exc), exc


@pytest.mark.parametrize("status", [400, 404])
def test_other_client_errors_are_not_retried(no_client_retries, status):
    with stub_server(status) as uri:
        exc = store_error(uri)
    assert not tracking._is_transient(exc) and tracking._auth_status(exc) is None, exc


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_fail_at_once_in_one_line(no_client_retries, monkeypatch, status):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-in-the-environment")
    with stub_server(status) as uri:
        exc = store_error(uri)
        start = time.monotonic()
        with pytest.raises(NernError) as raised:
            tracking._retry(lambda: client(uri).get_experiment_by_name("x"), "open the experiment", budget_s=30)
    assert time.monotonic() - start < 5, "credentials were retried"
    assert tracking._auth_status(exc) == status and not tracking._is_transient(exc)
    message = str(raised.value)
    assert "\n" not in message and f"HTTP {status}" in message and "MLFLOW_TRACKING_USERNAME" in message
    assert "s3cret" not in message


def test_retry_waits_out_an_outage_with_backoff_then_gives_up_with_the_budget(no_client_retries):
    with stub_server(503) as uri:
        outage = store_error(uri)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            raise outage
        return "ok"

    assert tracking._retry(flaky, "test", budget_s=30) == "ok" and calls["n"] == 4
    start = time.monotonic()
    with pytest.raises(tracking.StoreUnavailable, match=r"\(HTTP 503\): check that the tracking server is up"):
        tracking._retry(lambda: (_ for _ in ()).throw(outage), "log metrics", budget_s=0.5)
    assert time.monotonic() - start < 2


def test_mlflow_client_retry_budget_matches_a_measured_call_to_a_closed_port(monkeypatch):
    """MLflow's own budget (tracking.client_retry_budget_s) is what one call to a dead server takes: measured
    with 2 retries, factor 1, no jitter (0 + 2 s). The defaults give about 250 s."""
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"):
        monkeypatch.delenv(key, raising=False)
    default = tracking.client_retry_budget_s()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    budget = tracking.client_retry_budget_s()
    start = time.monotonic()
    exc = store_error(f"http://127.0.0.1:{free_port()}")
    took = time.monotonic() - start
    print(f"MLflow client retry budget: default {default:.0f} s; 2 retries x factor 1: computed {budget:.1f} s, "
          f"measured {took:.1f} s")
    assert budget == 2.0 and budget <= took < budget + 3, took
    assert 240 <= default <= 260 and tracking._is_transient(exc)


def test_credentials_in_the_uri_are_refused_without_echoing_them():
    with pytest.raises(NernError, match="MLFLOW_TRACKING_PASSWORD") as raised:
        tracking.default_tracking_uri("http://alice:hunter2@tracking:5000")
    assert "hunter2" not in str(raised.value)
    assert tracking.redact("see http://alice:hunter2@host/x") == "see http://***@host/x"


def test_sync_of_a_tree_without_journals_is_a_one_line_error(tmp_path, capsys):
    assert nern_main(["track", "sync", str(tmp_path), "--mlflow-uri", f"sqlite:///{tmp_path / 'store.db'}"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"nern track: error: no {JOURNAL_NAME} below {tmp_path}")
    assert not (tmp_path / "store.db").exists()


def offline_job(out: Path, uri: str, steps: int = 5, status_error: bool = False) -> Tracker:
    """A job whose store is away from the start: everything goes to its journal."""
    (out / "curves.csv").parent.mkdir(parents=True, exist_ok=True)
    (out / "curves.csv").write_text("iteration,loss\n0,1\n")
    tracker = Tracker(uri, "offline", f"job:{out.name}", {"rule": "fit"}, resume_key=str(out), digest="d1",
                      parent="preset", journal=out / JOURNAL_NAME)
    with tracker as tr:
        tr.log_params({"lr": 0.1, "hidden": 16})
        for step in range(steps):
            tr.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        tr.log_dataset("fashion_mnist", "/data/fm", "abcd", "training")
        tr.log_artifact(out / "curves.csv")
    return tracker


@pytest.fixture(scope="module")
def lab_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One embedded store for the tests that sync into one (each its own experiment): creating one costs
    seconds."""
    return tracking.default_uri(tmp_path_factory.mktemp("lab"))


def test_an_unreachable_store_leaves_a_journal_that_sync_replays_once(tmp_path, monkeypatch, capsys, lab_store):
    """The job completes although its store never answered; `nern track sync` then makes the store hold its
    run (parent, params, every point, dataset, artifact, FINISHED), and a second sync sends nothing."""
    monkeypatch.setenv(tracking.RETRY_ENV, "0.2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    results = tmp_path / "results"
    dead = f"http://127.0.0.1:{free_port()}"
    job = offline_job(results / "test" / "fit" / "a", dead, steps=7)
    assert job.outbox.offline and job.run_id is None
    journal = Journal(results / "test" / "fit" / "a" / JOURNAL_NAME)
    assert [r["op"] for r in journal.records()][-1] == "end"
    with open(journal.path, "a") as fh:
        fh.write('{"op": "metrics", "step": 99, "metr')  # a torn last line: the writer was killed mid-write
    store = lab_store
    assert nern_main(["track", "sync", str(results), "--mlflow-uri", store]) == 0
    assert "1 runs created" in capsys.readouterr().out
    assert nern_main(["track", "sync", str(results), "--mlflow-uri", store]) == 0
    assert "0 runs created, 1 found, 0 metric points sent" in capsys.readouterr().out
    mlflow_client = client(store)
    experiment = mlflow_client.get_experiment_by_name("offline").experiment_id
    runs = {r.info.run_name: r for r in mlflow_client.search_runs([experiment])}
    assert sorted(runs) == ["job:a", "preset"]
    run = runs["job:a"]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1", "hidden": "16"}
    assert run.data.tags["mlflow.parentRunId"] == runs["preset"].info.run_id
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "train/loss")] == list(range(7))
    assert [a.path for a in mlflow_client.list_artifacts(run.info.run_id)] == ["curves.csv"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["fashion_mnist"]


def test_a_rerun_with_another_config_starts_its_journal_afresh(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "0.2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "job"
    offline_job(out, f"http://127.0.0.1:{free_port()}")
    offline_job(out, f"http://127.0.0.1:{free_port()}")  # the same job again: appended
    assert sum(r["op"] == "start" for r in Journal(out / JOURNAL_NAME).records()) == 2
    Journal(out / JOURNAL_NAME).begin({"key": str(out), "digest": "d2", "experiment": "exp"})
    assert [r["op"] for r in Journal(out / JOURNAL_NAME).records()] == ["start"]


def test_a_resumed_job_sends_what_its_killed_offline_attempt_kept(tmp_path, monkeypatch, lab_store):
    """Attempt 1 ran while the store was away and was killed (no end) after its checkpoint at step 3; attempt 2
    resumes online from it, so it logs step 3 again (recomputed) and the later steps: the store ends with every
    step once, step 3 as attempt 2 logged it."""
    monkeypatch.setenv(tracking.RETRY_ENV, "0.2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "fit"

    def attempt(uri: str, steps: range, value: float) -> Tracker:
        tracker = Tracker(uri, "resumed", "fit", resume_key=str(out), digest="d1", journal=out / JOURNAL_NAME)
        tracker.start()
        for step in steps:
            tracker.log_metrics({"train/loss": value}, step=step)
        return tracker

    attempt(f"http://127.0.0.1:{free_port()}", range(0, 4), 1.0)  # killed: never ended
    second = attempt(lab_store, range(3, 5), 2.0)
    second.end()
    history = client(lab_store).get_metric_history(second.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    assert client(lab_store).get_run(second.run_id).info.status == "FINISHED"


def test_a_twin_left_by_a_resent_create_request_is_deleted(lab_store):
    """MLflow's client re-sends a POST whose answer was lost; the server may have committed the first: two runs
    with the same job tags and start time. The creator keeps one."""
    mlflow_client, experiment = tracking._open_store(lab_store, "twins")

    class ResendingClient:
        def __getattr__(self, name):
            return getattr(mlflow_client, name)

        def create_run(self, *args, **kwargs):
            mlflow_client.create_run(*args, **kwargs)  # the first request, committed, its answer lost
            return mlflow_client.create_run(*args, **kwargs)

    tags = {tracking.RESUME_TAG: "/out/a", tracking.CONFIG_TAG: "d1"}
    kept = tracking._create_run(ResendingClient(), experiment, "fit:a", tags, twins=tracking._job_twins("/out/a", "d1"))
    runs = mlflow_client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [kept]


def laptop_tree(results: Path, uri: str, jobs: int = 3, experiment: str = "test", journals: bool = True) -> None:
    """A laptop's results tree: jobs logged online to its embedded store, each with its journal (or none: runs
    logged before jobs kept journals)."""
    for index in range(jobs):
        out = results / experiment / f"job{index}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"top1": index}))
        with Tracker(uri, experiment, f"fit:job{index}", {"rule": "fit"}, resume_key=str(out), digest=f"d{index}",
                     parent=experiment, journal=out / JOURNAL_NAME if journals else None) as tr:
            tr.log_params({"hidden": 16 * (index + 1)})
            for step in range(0, 12, 3):
                tr.log_metrics({"train/loss": 1.0 / (step + 1), "eval/top1": step + index}, step=step)
            tr.log_dataset("fashion_mnist", "/data/fm", "abcd", "training")
            tr.log_artifact(out / "metrics.json")


def test_a_laptops_results_tree_moves_to_another_store_once(tmp_path, lab_store):
    laptop = tracking.default_uri(tmp_path / "results")
    laptop_tree(tmp_path / "results", laptop)
    lab = lab_store
    first = tracking.sync_results(tmp_path / "results", lab)
    again = tracking.sync_results(tmp_path / "results", lab)
    assert [j.created for j in first] == [True] * 3 and [j.created for j in again] == [False] * 3
    assert all(not any(j.sent.values()) for j in again)
    counts = {"fit": 3}
    moved, total = store_jobs(lab, "test")
    check_one_finished_run_per_job(moved, counts)
    same_runs(moved, store_jobs(laptop, "test")[0])
    assert total == 4  # three jobs and their parent


def test_runs_logged_before_journals_move_from_a_copy_of_the_laptops_tree(tmp_path, lab_store, capsys):
    """Runs only the laptop's store holds (no journals yet): sync writes their journals into the copied tree
    (found by their place below the results directory) and moves them, once."""
    laptop = tmp_path / "laptop" / "results"
    laptop_tree(laptop, tracking.default_uri(laptop), experiment="old", journals=False)
    copied = tmp_path / "cluster" / "results"
    shutil.copytree(laptop, copied)
    assert nern_main(["track", "sync", str(copied), "--mlflow-uri", lab_store]) == 0
    assert "wrote the journals of 3 jobs" in capsys.readouterr().out
    assert len(list(copied.rglob(JOURNAL_NAME))) == 3 and not list(laptop.rglob(JOURNAL_NAME))
    assert nern_main(["track", "sync", str(copied), "--mlflow-uri", lab_store]) == 0
    out = capsys.readouterr().out
    assert "wrote the journals" not in out and "0 runs created, 3 found, 0 metric points sent" in out
    moved, total = store_jobs(lab_store, "old")
    check_one_finished_run_per_job(moved, {"fit": 3})
    same_runs(moved, store_jobs(tracking.default_uri(laptop), "old")[0])
    assert total == 4
    mlflow_client = client(lab_store)
    experiment = mlflow_client.get_experiment_by_name("old").experiment_id
    for run in mlflow_client.search_runs([experiment], filter_string="tags.rule = 'fit'"):
        assert [a.path for a in mlflow_client.list_artifacts(run.info.run_id)] == ["metrics.json"]


# ------------------------------------------------------------------------------------------------ the server


@dataclass
class PipelineRun:
    workdir: Path
    counts: dict[str, int]
    seconds: float
    uri: str


@pytest.fixture(scope="module")
def reference_run(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """The tiny workflow against a plain server, undisturbed: the results the disturbed run must match."""
    workdir = tmp_path_factory.mktemp("reference")
    configfile = server_config(workdir / "server.yaml", mlflow_server.uri)
    start = time.monotonic()
    snake = start_pipeline(workdir, configfile, server_env(mlflow_server))
    snake.wait()
    text = pipeline_output(workdir)
    assert snake.returncode == 0, text[-6000:]
    return PipelineRun(workdir, job_counts(text), time.monotonic() - start, mlflow_server.uri)


@pytest.mark.slow
def test_tiny_workflow_logs_to_a_tracking_server(reference_run: PipelineRun) -> None:
    """One FINISHED run per job, children of the preset's one parent run, each with its params, metrics
    (curves included), dataset input and output files, as with the embedded store."""
    print(f"tiny workflow against an mlflow server: {reference_run.seconds:.0f} s, jobs {reference_run.counts}")
    jobs, _ = store_jobs(reference_run.uri, "test")
    check_one_finished_run_per_job(jobs, reference_run.counts)
    fit = next(j for j in jobs if j.rule == "fit")
    assert "reconstructed_top1" in fit.steps and len(fit.steps["train/loss"]) > 1
    assert tables(reference_run.workdir), "no tables"
    assert not (reference_run.workdir / "results" / "mlflow.db").exists(), "logged to the embedded store"
    journals = sorted(reference_run.workdir.rglob(JOURNAL_NAME))
    assert len(journals) == len(jobs)


@pytest.mark.slow
def test_a_wrong_password_fails_the_job_before_any_compute(mlflow_auth_server: MlflowServer, tmp_path) -> None:
    """The stage fails in one line naming the fix, before it reads any data (the data root does not exist,
    so a stage that got as far as its data would fail otherwise), and the password appears nowhere."""
    env = server_env(mlflow_auth_server, password="wrong-" + mlflow_auth_server.password[::-1])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nern", "pretrain", "--out", str(out), "--mlflow-uri", mlflow_auth_server.uri,
               "--set", f"data.root={tmp_path / 'no-data-here'}", "--set", "device=cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("nern pretrain: error: the MLflow tracking server rejected the credentials")
    assert "Traceback" not in done.stderr and "MLFLOW_TRACKING_PASSWORD" in lines[-1]
    assert not out.exists() or not any(out.iterdir()), "the stage wrote outputs"
    assert env["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr


def job_commands(snake_pid: int) -> list[str]:
    """`... -m nern <stage>` of every nern job of this Snakemake (a job that just ended is left out)."""
    found = []
    for proc in nern_jobs(snake_pid):
        with contextlib.suppress(psutil.Error):
            found.append(" ".join(proc.cmdline()[:4]))
    return found


@dataclass
class Outages:
    """Kills the server at seeded moments of a running pipeline and restarts it after a seeded outage: as the
    first job starts (its first calls: the parent run, its own run), as the fits start, and as the first fit
    finishes (its last calls: metrics, artifacts, FINISHED). The pipeline reaches each moment only after the
    one before it: a fit waits for the pretrained network, and a fit cannot finish before its start got past
    the store (or past nern's retry budget)."""

    server: MlflowServer
    rng: random.Random
    workdir: Path
    log: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # each outage, kill to /health answering again

    def run(self, snake: subprocess.Popen) -> None:
        plan = [("first job starts", LONG_DOWN_S), ("fits start", SHORT_DOWN_S), ("a fit finishes", LONG_DOWN_S)]
        for moment, down in plan:
            if not self._wait_for(moment, snake, self.rng.uniform(0.0, 2.0)):
                break
            self._outage(moment, self.rng.uniform(*down))
        snake.wait()

    def _fit_results(self) -> set[Path]:
        return set(self.workdir.glob("results/*/*/fit/**/metrics.json"))

    def _wait_for(self, moment: str, snake: subprocess.Popen, delay_s: float) -> bool:
        """Poll until the moment came `delay_s` ago (a finish: at once); False when the pipeline ended first."""
        done_before, seen_at = self._fit_results(), None
        while snake.poll() is None:
            if seen_at is None:
                jobs = job_commands(snake.pid)
                if moment == "first job starts" and jobs:
                    seen_at = time.monotonic()
                elif moment == "fits start" and any("nern fit" in job for job in jobs):
                    seen_at = time.monotonic()
                elif moment == "a fit finishes" and self._fit_results() - done_before:
                    return True
            if seen_at is not None and time.monotonic() >= seen_at + delay_s:
                return True
            time.sleep(0.02)
        return False

    def _outage(self, moment: str, down_s: float) -> None:
        killed_at = time.monotonic()
        self.server.kill()
        time.sleep(down_s)  # the outage itself: nothing to poll for
        restart_s = self.server.start()
        self.seconds.append(time.monotonic() - killed_at)
        self.log.append(f"{moment}: down {self.seconds[-1]:.1f} s (restart {restart_s:.1f} s)")
        print(f"server outage: {self.log[-1]}", flush=True)


def unsent_jobs(workdir: Path, uri: str) -> list[str]:
    """Jobs whose run the store does not (yet) hold as FINISHED: what a sync must replay."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name("test")
    runs = mlflow_client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
    finished = {r.data.tags.get(tracking.RESUME_TAG) for r in runs if r.info.status == "FINISHED"}
    return [str(p.parent) for p in workdir.rglob(JOURNAL_NAME) if str(p.parent.resolve()) not in finished]


@pytest.mark.slow
@pytest.mark.fault
def test_tiny_workflow_survives_server_kills_with_authentication(reference_run: PipelineRun,
                                                                mlflow_auth_server: MlflowServer,
                                                                tmp_path: Path) -> None:
    """The server (basic auth, a planted password) is SIGKILLed three times mid-pipeline and restarted after
    outages longer than MLflow's client budget and nern's (both shrunk). Every job completes at
    the first try, the results on disk are the undisturbed run's, `nern track sync` replays what the outages
    left unsent, and then MLflow holds exactly one FINISHED run per job with all its metrics; a second sync
    sends nothing. The password appears in no file the pipeline wrote, nor in the report or the store."""
    server = mlflow_auth_server
    env = server_env(server)
    chain = faults.chain("tiny workflow, mlflow server SIGKILLed")
    configfile = server_config(tmp_path / "server.yaml", server.uri)
    workdir = tmp_path / "run"
    workdir.mkdir()
    start = time.monotonic()
    outages = Outages(server, random.Random(SEED), workdir)
    restarts_before = server.restarts
    snake = start_pipeline(workdir, configfile, env)
    try:
        outages.run(snake)
    finally:
        if snake.poll() is None:
            snake.kill()
    text = pipeline_output(workdir)
    assert snake.returncode == 0 and "Error in rule" not in text, text[-6000:]
    assert len(outages.log) == 3, f"the pipeline ended before three outages: {outages.log}"
    with client_env(env):
        assert min(outages.seconds) > tracking.client_retry_budget_s() + 1, "an outage within MLflow's own retries"
    with client_env(env):
        left = unsent_jobs(workdir, server.uri)
    offline = sum("goes on and keeps" in p.read_text(errors="replace") for p in (workdir / "logs").rglob("*.log"))
    synced = sync(workdir / "results", server.uri, env)
    assert synced.returncode == 0, synced.stderr[-3000:]
    print(f"pipeline with 3 server outages: {time.monotonic() - start:.0f} s ({'; '.join(outages.log)}); "
          f"{offline} jobs went offline, {len(left)} left their run for sync; "
          f"{synced.stdout.strip().splitlines()[-1]}")

    assert tables(workdir) == tables(reference_run.workdir)
    assert metrics_results(workdir) == metrics_results(reference_run.workdir)
    with client_env(env):
        jobs, _ = store_jobs(server.uri, "test")
    check_one_finished_run_per_job(jobs, job_counts(text))
    same_runs(jobs, store_jobs(reference_run.uri, "test")[0])
    again = sync(workdir / "results", server.uri, env)
    assert again.returncode == 0 and "0 runs created" in again.stdout and "0 metric points sent" in again.stdout

    report = start_pipeline(workdir, configfile, env, "--report", str(workdir / "report.html"))
    assert report.wait() == 0 and (workdir / "report.html").stat().st_size > 10_000, pipeline_output(workdir)[-3000:]
    store_files = [*server.root.glob("mlflow.db*"), server.root / "artifacts"]
    leaked = files_with(server.password, workdir, *store_files)
    assert leaked == [], f"the password is in {leaked}"
    assert server.password not in synced.stdout + synced.stderr + again.stdout + again.stderr
    faults.record_server_restarts(server.restarts - restarts_before)
    chain.completed()


LOAD_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mlflow  # imported before the barrier, so all workers hit the server together
    from nern.tracking import Tracker
    uri, index, go, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    job = out / f"job{index}"
    Path(f"{go}.ready{index}").touch()
    while not go.exists():
        time.sleep(0.01)
    with Tracker(uri, "load", f"job{index}", {"worker": str(index)}, resume_key=str(job), digest="d0",
                 parent="load", journal=job / "mlflow-journal.jsonl") as tr:
        tr.log_params({f"p{j}": j * index for j in range(10)})
        for step in range(ITERATIONS):
            time.sleep(PAUSE_S)  # the work between two logs
            if step % EVERY == 0:
                tr.log_metrics({"loss": 1.0 / (step + 1), "acc": step / ITERATIONS}, step=step)
    """
)
LOAD_JOBS, ITERATIONS, EVERY, PAUSE_S = 16, 120, 4, 0.05


def start_workers(tmp_path: Path, uri: str, env: dict[str, str]) -> list[subprocess.Popen]:
    script = LOAD_WORKER.replace("ITERATIONS", str(ITERATIONS)).replace("EVERY", str(EVERY))
    script = script.replace("PAUSE_S", str(PAUSE_S))
    env = {**env, "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")}
    return [subprocess.Popen([sys.executable, "-c", script, uri, str(i), str(tmp_path / "go"), str(tmp_path)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(LOAD_JOBS)]


def release(workers: list[subprocess.Popen], tmp_path: Path, timeout_s: float = 300) -> None:
    """Start the workers together once all are ready (bounded: a worker that died ends the wait)."""
    deadline = time.monotonic() + timeout_s
    while len(list(tmp_path.glob("go.ready*"))) < len(workers) and time.monotonic() < deadline:
        if any(w.poll() not in (None, 0) for w in workers):
            break
        time.sleep(0.05)
    (tmp_path / "go").touch()


@pytest.mark.slow
@pytest.mark.fault
def test_sixteen_jobs_log_to_one_server_through_a_restart(mlflow_auth_server: MlflowServer, tmp_path) -> None:
    """16 jobs log metrics every few iterations to one server at once, which is SIGKILLed and restarted while
    they do: every job's run is FINISHED with every point once; none lost, none duplicated."""
    server = mlflow_auth_server
    env = server_env(server, retry_s=LOAD_RETRY_S)
    chain = faults.chain("16 concurrent jobs, mlflow server SIGKILLed")
    restarts_before = server.restarts
    workers = start_workers(tmp_path, server.uri, env)
    rng = random.Random(SEED)
    try:
        release(workers, tmp_path)
        released = time.monotonic()
        time.sleep(rng.uniform(1.0, 3.0))  # a seeded moment while they log
        server.kill()
        time.sleep(rng.uniform(*SHORT_DOWN_S))
        restart_s = server.start()
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        print(f"16 writers: server killed and restarted in {restart_s:.1f} s; all done "
              f"{time.monotonic() - released:.0f} s after the release; "
              f"{sum('goes on and keeps' in out for out in outputs)} went offline")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, out in zip(workers, outputs):
        assert worker.returncode == 0, out[-3000:]
    with client_env(env):
        mlflow_client = client(server.uri)
        experiment = mlflow_client.get_experiment_by_name("load").experiment_id
        runs = mlflow_client.search_runs([experiment], max_results=1000)
        jobs = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
        expected = list(range(0, ITERATIONS, EVERY))
        complete = [r for r in jobs if r.info.status == "FINISHED" and all(
            sorted(m.step for m in mlflow_client.get_metric_history(r.info.run_id, key)) == expected
            for key in ("loss", "acc"))]
    faults.record_concurrent(len(complete), LOAD_JOBS)
    assert len(runs) == LOAD_JOBS + 1 and len(jobs) == LOAD_JOBS, f"{len(jobs)} job runs for {LOAD_JOBS} jobs"
    assert len(complete) == LOAD_JOBS, "a run lost points, holds duplicates, or did not finish"
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {r.info.run_id for r in runs if r not in jobs}
    faults.record_server_restarts(server.restarts - restarts_before)
    chain.completed()


@pytest.mark.slow
def test_sync_moves_runs_from_a_server_to_sqlite_and_from_sqlite_to_a_server(reference_run: PipelineRun,
                                                                           mlflow_auth_server: MlflowServer,
                                                                           tmp_path: Path) -> None:
    """Both ways: the server run's results tree into an embedded store, a laptop's tree (embedded store)
    into a server with authentication; each equal to its source, and a second sync sends nothing."""
    uri = f"sqlite:///{tmp_path / 'laptop.db'}"
    first = tracking.sync_results(reference_run.workdir / "results", uri)
    again = tracking.sync_results(reference_run.workdir / "results", uri)
    assert all(j.created for j in first) and not any(j.created or any(j.sent.values()) for j in again)
    same_runs(store_jobs(uri, "test")[0], store_jobs(reference_run.uri, "test")[0])

    results = tmp_path / "results"
    laptop_tree(results, tracking.default_uri(results))
    with client_env(server_env(mlflow_auth_server)):
        first = tracking.sync_results(results, mlflow_auth_server.uri)
        again = tracking.sync_results(results, mlflow_auth_server.uri)
        moved, _ = store_jobs(mlflow_auth_server.uri, "test")
    assert all(j.created for j in first) and not any(j.created or any(j.sent.values()) for j in again)
    laptop_jobs = store_jobs(tracking.default_uri(results), "test")[0]
    assert [j for j in moved if j.name.startswith("fit:job")] == laptop_jobs
