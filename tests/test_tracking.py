"""MLflow tracking: read back what a run logged, resume a run, no-op when off, and no loss under 8 writers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nern import tracking
from nern.errors import NernError
from nern.tracking import Tracker

pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One store for the tests that do not care about its location: creating a store costs seconds."""
    return tracking.default_uri(tmp_path_factory.mktemp("store"))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_run_is_readable_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the cwd
    results = tmp_path / "results"
    note = tmp_path / "note.txt"
    note.write_text("hello\n")
    with Tracker(None, "exp", "fit-a", {"stage": "fit"}, results_dir=results) as tr:
        tr.log_params({"fit.lr": 0.01, "fit.hidden": 180, "long": "x" * 10_000, "bad key!": 1})
        for step in range(3):
            tr.log_metrics({"loss": 1.0 / (step + 1), "skipped": None}, step=step)
        tr.log_artifact(note, artifact_path="notes")
        tr.set_tags({"seed": 0})
        run_id = tr.run_id
    assert tr.uri == f"sqlite:///{results.resolve() / 'mlflow.db'}"

    client = _client(tr.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "fit-a"
    assert run.data.params["fit.lr"] == "0.01" and run.data.params["fit.hidden"] == "180"
    assert len(run.data.params["long"]) == tracking.MAX_PARAM_VALUE
    assert run.data.params["long"].endswith(tracking.TRUNCATION_MARK)
    assert run.data.params["bad key_"] == "1"
    assert run.data.tags["stage"] == "fit" and run.data.tags["seed"] == "0"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert run.info.artifact_uri.startswith((results / "mlartifacts").resolve().as_uri())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt", "results"]


def test_resume_appends_to_the_same_run(store_uri):
    uri = store_uri
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(uri, "exp", "fit-resume", {}) as tr:
            tr.log_params({"lr": 0.1})
            tr.log_metrics({"loss": 2.0}, step=0)
            raise RuntimeError("boom")
    run_id = tr.run_id
    assert _client(uri).get_run(run_id).info.status == "FAILED"

    with Tracker(uri, "exp", "fit-resume", {"resumed": "1"}, run_id=run_id) as again:
        again.log_params({"lr": 0.1})  # same value: accepted
        with pytest.raises(NernError, match="already has param lr"):
            again.log_params({"lr": 0.2})
        again.log_metrics({"loss": 1.0}, step=1)
    assert again.run_id == run_id

    client = _client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1]
    assert len(client.search_runs([run.info.experiment_id], "tags.mlflow.runName = 'fit-resume'")) == 1


def test_keyboard_interrupt_marks_run_killed(store_uri):
    uri = store_uri
    with pytest.raises(KeyboardInterrupt):
        with Tracker(uri, "exp", "fit") as tr:
            raise KeyboardInterrupt
    assert _client(uri).get_run(tr.run_id).info.status == "KILLED"


def test_unknown_run_id_is_a_user_error(store_uri):
    with pytest.raises(NernError, match="is not in"):
        Tracker(store_uri, "exp", "fit", run_id="0" * 32).start()


@pytest.mark.parametrize("kwargs", [{"uri": "none"}, {"uri": "NONE"}, {"uri": None, "enabled": False}])
def test_disabled_tracker_is_a_noop(tmp_path, monkeypatch, kwargs):
    monkeypatch.chdir(tmp_path)
    with Tracker(experiment="exp", run_name="fit", tags={"a": "b"}, **kwargs) as tr:
        tr.log_params({"lr": 1})
        tr.log_metrics({"loss": 1.0}, step=0)
        tr.log_artifact(tmp_path / "missing.txt")
        tr.set_tags({"x": 1})
    assert tr.run_id is None and not tr.enabled
    assert list(tmp_path.iterdir()) == []


def test_uri_resolution(tmp_path, monkeypatch):
    """--mlflow-uri, then $NERN_MLFLOW_URI, then $MLFLOW_TRACKING_URI, then ./results/mlflow.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("NERN_MLFLOW_URI", raising=False)
    resolve = tracking.default_tracking_uri
    assert resolve() == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    assert resolve(None, "res") == f"sqlite:///{tmp_path / 'res' / 'mlflow.db'}"
    assert resolve("sqlite:///rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"
    assert resolve("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve(None) == "http://tracking:5000"
    monkeypatch.setenv("NERN_MLFLOW_URI", "sqlite:///nern.db")
    assert resolve(None) == f"sqlite:///{tmp_path / 'nern.db'}"
    assert resolve("NONE") == tracking.DISABLED
    with pytest.raises(NernError, match="no scheme"):
        resolve("results/mlflow.db")


def test_retry_waits_out_locks_but_not_schema_errors():
    import sqlite3

    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert tracking._retry(flaky, "test") == "ok" and calls["n"] == 3
    with pytest.raises(sqlite3.OperationalError):
        tracking._retry(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("no such table: runs")), "test")
    with pytest.raises(NernError, match="stayed unavailable"):
        tracking._retry(lambda: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")), "x", 0.3)


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mlflow  # imported before the barrier so all workers hit the store together
    from nern.tracking import Tracker
    uri, index, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    Path(f"{go}.ready{index}").touch()
    while not go.exists():
        time.sleep(0.01)
    with Tracker(uri, "concurrency", f"run{index}", {"worker": str(index)}) as tr:
        tr.log_params({f"p{j}": j * index for j in range(20)})
        for step in range(50):
            tr.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 50}, step=step)
    """
)


@pytest.mark.slow
def test_eight_processes_share_one_fresh_sqlite_store(tmp_path):
    """Opening a fresh store and logging from 8 processes at once loses no run, param or metric point."""
    uri = tracking.default_uri(tmp_path / "results")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, uri, str(i), str(go)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(8)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 8 and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    client = _client(uri)
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 8
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sum(len(r.data.params) for r in runs) == 8 * 20
    points = sum(len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in ("loss", "acc"))
    assert points == 8 * 50 * 2


def test_unfinished_run_of_the_same_output_is_reopened_not_duplicated(tmp_path):
    """A job killed after creating its run but before saving the run id still ends up as one run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "exp", "fit", resume_key="/runs/o'ut")
    first.start()  # never ended: the process was killed
    again = Tracker(uri, "exp", "fit", resume_key="/runs/o'ut")
    again.start()
    assert again.run_id == first.run_id
    again.end()
    fresh = Tracker(uri, "exp", "fit", resume_key="/runs/o'ut")  # the finished run is not reopened
    fresh.start()
    assert fresh.run_id != first.run_id
    fresh.end()


def test_a_rerun_of_the_same_job_reopens_its_finished_run_and_a_changed_config_does_not(tmp_path):
    """Killed after the run was marked FINISHED but before the process exited: the rerun (same output, same
    config digest) lands in the same run; a changed result-affecting config is a new job and a new run, and
    the unfinished runs it replaces are closed."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker(uri, "exp", "fit", resume_key="/runs/a", digest="d1") as first:
        first.log_params({"lr": 0.1})
    with Tracker(uri, "exp", "fit", resume_key="/runs/a", digest="d1") as again:
        assert again.resumed
        again.log_params({"lr": 0.1})
    assert again.run_id == first.run_id
    abandoned = Tracker(uri, "exp", "fit", resume_key="/runs/a", digest="d2")
    abandoned.start()  # killed: never ended
    assert abandoned.run_id != first.run_id and not abandoned.resumed
    with Tracker(uri, "exp", "fit", resume_key="/runs/a", digest="d3") as changed:
        changed.log_params({"lr": 0.2})  # a new run: no clash with the old job's lr
    client = _client(uri)
    assert changed.run_id not in (first.run_id, abandoned.run_id)
    assert client.get_run(abandoned.run_id).info.status == "KILLED"
    assert client.get_run(first.run_id).info.status == "FINISHED"
    with Tracker(uri, "exp", "fit", resume_key="/runs/b", digest="d1") as other:
        pass
    assert other.run_id not in (first.run_id, changed.run_id), "another output directory is another job"


def test_config_digest_ignores_order_but_not_values():
    assert tracking.config_digest({"a": 1, "b": 2}) == tracking.config_digest({"b": 2, "a": 1})
    assert tracking.config_digest({"a": 1}) != tracking.config_digest({"a": 2})


def test_jobs_with_a_parent_are_children_of_one_parent_run(store_uri):
    """The pipeline's grouping: every job of a preset is a child of the one run named after the preset."""
    from mlflow.tracking import MlflowClient

    ids = []
    for job in ("a", "b"):
        with Tracker(store_uri, "parents", f"job-{job}", parent="preset-x", resume_key=f"/out/{job}",
                     digest="d0") as tr:
            ids.append(tr.run_id)
    with Tracker(store_uri, "parents", "job-c", parent="preset-y", resume_key="/out/c") as tr:
        other = tr.run_id
    client = MlflowClient(tracking_uri=store_uri)
    exp = client.get_experiment_by_name("parents").experiment_id
    parents = client.search_runs([exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = 'preset-x'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_name == "preset-x"
    children = {client.get_run(i).data.tags["mlflow.parentRunId"] for i in ids}
    assert children == {parents[0].info.run_id}
    assert client.get_run(other).data.tags["mlflow.parentRunId"] != parents[0].info.run_id
    with Tracker(store_uri, "parents", "job-a", parent="preset-x", resume_key="/out/a", digest="d0") as tr:
        assert tr.run_id == ids[0]  # the rerun of a job stays the same child
    assert len(client.search_runs([exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = 'preset-x'")) == 1


def test_dataset_inputs_are_logged_with_name_source_digest_and_context(store_uri):
    from mlflow.tracking import MlflowClient

    with Tracker(store_uri, "datasets", "job", resume_key="/out/ds") as tr:
        tr.log_dataset("fashion_mnist", "/data/FashionMNIST/raw", "0123abcd", "training")
        run_id = tr.run_id
    inputs = MlflowClient(tracking_uri=store_uri).get_run(run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("fashion_mnist", "0123abcd")]
    assert "/data/FashionMNIST/raw" in inputs[0].dataset.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
