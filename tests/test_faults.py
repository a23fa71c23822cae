"""Fault injection on real processes: `nern fit` / `nern pretrain` killed (SIGKILL) or pre-empted (SIGTERM) at
several points and started again must end exactly like an uninterrupted run with the same seed, as ONE
finished MLflow run, without a metrics.json whose predictor is missing and without stray temporaries.

Every run here is a `python -m nern ...` subprocess on real Fashion-MNIST with a tiny config (resnet8 with one
input channel, a 16-unit predictor, one thread), so a run takes a few seconds. Kill points are found by polling
the checkpoint file (a new inode/mtime = one more checkpoint written); the writes of the final outputs are
held by a small shim (`STALL_SHIM`) that stops the process just before it renames a chosen file into place.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import faults
from helpers import fashion_mnist_root, grey_model, sets  # noqa: F401 (fixtures)
from helpers import fmnist_args as data_args
from nern.artifacts import load_tensors
from nern.fit import NON_RESULT_KEYS

pytestmark = [pytest.mark.fault, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 300.0  # the machine may be shared with heavy jobs: generous, only reached when something hangs
POLL_S = 0.003

FIT_ITERATIONS, FIT_CHECKPOINT_EVERY = 24, 4  # checkpoints at 4, 8, ..., 24
PRETRAIN_EPOCHS, PRETRAIN_CHECKPOINT_EVERY = 0.03, 8  # 57 iterations of 32 images; checkpoints at 8, ..., 56
PRETRAIN_ITERATIONS = 57
# Keys that measure time (or say whether the run resumed): everything else must match bit for bit.
NON_RESULT_METRICS = {"wall_seconds", "train_seconds", "eval_seconds", "seconds_per_iteration", "resumed"}

# Runs `nern` like `python -m nern`, but stops just before `os.replace` renames a finished temporary onto the
# file named by $NERN_FAULT_STALL (after skipping $NERN_FAULT_SKIP such renames) and touches $NERN_FAULT_MARK,
# so the test can SIGKILL the process at exactly that point.
STALL_SHIM = """
import os, runpy, sys, time
from pathlib import Path
target, mark = os.environ["NERN_FAULT_STALL"], os.environ["NERN_FAULT_MARK"]
skip = int(os.environ.get("NERN_FAULT_SKIP", "0"))
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if Path(dst).name == target:
        seen[0] += 1
        if seen[0] > skip:
            Path(mark).write_text(str(src))
            time.sleep(3600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["nern", *sys.argv[1:]]
runpy.run_module("nern", run_name="__main__", alter_sys=True)
"""


# ------------------------------------------------------------------------------------------------ commands


def fit_args(root: Path, model: Path, out: Path, *extra: str, mlflow: str = "none") -> list[str]:
    return ["fit", "--model", str(model), "--out", str(out), "--mlflow-uri", mlflow, "--experiment", "faults",
            *data_args(root),
            *sets("predictor.hidden=16", "embedding.levels=4", "sampling.batch=64", "progress=false", "threads=1",
                  f"iterations={FIT_ITERATIONS}", f"checkpoint_every={FIT_CHECKPOINT_EVERY}", "eval_every=12",
                  "select_best_on_val=true"),
            *extra]


def pretrain_args(root: Path, out: Path, *extra: str, mlflow: str = "none") -> list[str]:
    return ["pretrain", "--out", str(out), "--mlflow-uri", mlflow, "--experiment", "faults", *data_args(root),
            *sets("model.arch=resnet8", "model.in_channels=1", f"epochs={PRETRAIN_EPOCHS}",
                  f"checkpoint_every={PRETRAIN_CHECKPOINT_EVERY}", "eval_every_epochs=0.015", "progress=false",
                  "threads=1"),
            *extra]


class Nern:
    """One `python -m nern ...` process; its output goes to a log file beside the output directory."""

    count = 0
    started: list[Nern] = []

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None, shim: str | None = None):
        Nern.count += 1
        self.log = workdir / f"nern-{Nern.count}.log"
        command = [sys.executable, "-c", shim, *args] if shim else [sys.executable, "-m", "nern", *args]
        full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {})}
        with open(self.log, "wb") as fh:
            self.popen = subprocess.Popen(command, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
        Nern.started.append(self)

    @classmethod
    def reap(cls) -> None:
        """SIGKILL what a failed test left running (a stalled process would otherwise sleep for an hour)."""
        for proc in cls.started:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()
        cls.started.clear()

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"nern did not finish within {timeout:.0f} s:\n{self.output()}")

    def signal(self, sig: int) -> int:
        self.popen.send_signal(sig)
        return self.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


class CheckpointWatch:
    """Sees each checkpoint write as a change of the file's inode/mtime (atomic writes rename a new file in)."""

    def __init__(self, path: Path):
        self.path = path
        self.last = self._key()
        self.times: list[float] = []

    def _key(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def poll(self) -> bool:
        key = self._key()
        if key is None or key == self.last:
            return False
        self.last = key
        self.times.append(time.monotonic())
        return True


def run_to_end(args: list[str], workdir: Path, checkpoint: Path | None = None) -> tuple[int, list[float]]:
    """Run to completion; returns the exit status and the times of the checkpoint writes seen on the way."""
    proc = Nern(args, workdir)
    watch = CheckpointWatch(checkpoint) if checkpoint else None
    deadline = time.monotonic() + WAIT_S
    while proc.poll() is None:
        if watch:
            watch.poll()
        if time.monotonic() > deadline:
            proc.wait(0)
        time.sleep(POLL_S * 3)
    code = proc.wait()
    assert code == 0, proc.output()
    return code, watch.times if watch else []


def interrupt(args: list[str], workdir: Path, checkpoint: Path, *, writes: int, delay: float = 0.0,
              sig: int = signal.SIGKILL) -> tuple[int, Nern]:
    """Start a run and send it `sig` `delay` seconds after its `writes`-th checkpoint write; (exit status, process)."""
    watch = CheckpointWatch(checkpoint)  # before the start, so no write can be missed
    proc = Nern(args, workdir)
    deadline = time.monotonic() + WAIT_S
    while len(watch.times) < writes:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.poll()}) before its checkpoint write {writes}:\n{proc.output()}")
        if time.monotonic() > deadline:
            proc.wait(0)
        watch.poll()
        time.sleep(POLL_S)
    if delay:
        time.sleep(delay)
    assert proc.poll() is None, f"the run ended before the kill point:\n{proc.output()}"
    return proc.signal(sig), proc


def checkpoint_iteration(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["iteration"])


def temporaries(out: Path) -> list[str]:
    return sorted(name for name in os.listdir(out) if name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------ comparing


def assert_same_metrics(out: Path, reference: Path) -> dict:
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    for key in ("reconstructed_top1", "final_loss", "rec_rmse", "test_top1", "val_top1"):
        if key in want:
            assert got[key] == want[key], (key, got[key], want[key])
    strip = lambda m: {k: v for k, v in m.items() if k not in NON_RESULT_METRICS}  # noqa: E731
    assert strip(got) == strip(want)
    return got


def assert_same_tensors(file: Path, reference: Path) -> None:
    got, got_meta = load_tensors(file)
    want, want_meta = load_tensors(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), f"{file.name}: {key} differs"
    assert _result_settings(got_meta) == _result_settings(want_meta)


def _result_settings(meta: dict) -> dict:
    """File metadata without the settings a resumed run may change (fit.NON_RESULT_KEYS)."""
    return {k: {kk: vv for kk, vv in v.items() if kk not in NON_RESULT_KEYS} if isinstance(v, dict) else v
            for k, v in meta.items()}


def assert_same_fit(out: Path, reference: Path) -> dict:
    metrics = assert_same_metrics(out, reference)
    assert metrics["iterations"] == FIT_ITERATIONS
    assert_same_tensors(out / "predictor.safetensors", reference / "predictor.safetensors")
    assert (out / "curves.csv").read_text() == (reference / "curves.csv").read_text()
    return metrics


def assert_same_pretrain(out: Path, reference: Path) -> dict:
    metrics = assert_same_metrics(out, reference)
    assert metrics["iterations"] == PRETRAIN_ITERATIONS
    assert_same_tensors(out / "model.safetensors", reference / "model.safetensors")
    assert (out / "curves.csv").read_text() == (reference / "curves.csv").read_text()
    return metrics


# ------------------------------------------------------------------------------------------------ fixtures


class Baseline:
    """An uninterrupted run, and how long its checkpoints took to come."""

    def __init__(self, out: Path, times: list[float]):
        self.out = out
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        self.checkpoint_interval = gaps[len(gaps) // 2] if gaps else 0.5

    @property
    def half_interval(self) -> float:
        return max(0.02, self.checkpoint_interval / 2)


@pytest.fixture(autouse=True, scope="module")
def _reap_module() -> Iterator[None]:
    yield
    Nern.reap()


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    Nern.reap()


@pytest.fixture(scope="module")
def fit_baseline(tmp_path_factory, fashion_mnist_root, grey_model) -> Baseline:
    work = tmp_path_factory.mktemp("fit-baseline")
    out = work / "out"
    _, times = run_to_end(fit_args(fashion_mnist_root, grey_model, out), work, out / "checkpoint.pt")
    assert json.loads((out / "metrics.json").read_text())["resumed"] is False
    return Baseline(out, times)


@pytest.fixture(scope="module")
def pretrain_baseline(tmp_path_factory, fashion_mnist_root) -> Baseline:
    work = tmp_path_factory.mktemp("pretrain-baseline")
    out = work / "out"
    _, times = run_to_end(pretrain_args(fashion_mnist_root, out), work, out / "checkpoint.pt")
    return Baseline(out, times)


# ------------------------------------------------------------------------------------------------ SIGKILL / SIGTERM


def _interrupt_chain(run: faults.RunChain, args: list[str], workdir: Path, out: Path, plan, total: int) -> list[int]:
    """Start the run once per (signal, checkpoint writes, delay) in `plan` and interrupt it there; returns the
    iterations the checkpoint held after each interruption, which must grow (every restart resumed)."""
    ckpt = out / "checkpoint.pt"
    held = []
    for sig, writes, delay in plan:
        code, proc = interrupt(args, workdir, ckpt, writes=writes, delay=delay, sig=sig)
        if sig == signal.SIGTERM:
            assert code == 143, proc.output()
            assert "rerun the same command to resume" in proc.output().strip().splitlines()[-1]
        else:
            assert code == -signal.SIGKILL, proc.output()
        run.killed(signal.Signals(sig).name)
        held.append(checkpoint_iteration(ckpt))
        assert not (out / "metrics.json").exists()
    assert held == sorted(set(held)) and 0 < held[0] and held[-1] < total, held
    return held


def test_fit_killed_and_preempted_at_several_points_resumes_exactly(fit_baseline, fashion_mnist_root, grey_model,
                                                                    tmp_path):
    """SIGKILL right after the 1st checkpoint, SIGTERM and SIGKILL mid-way between two checkpoints, SIGKILL right
    after the next write; the last restart also changes checkpoint_every (a setting that does not affect results).
    The fit ends with the uninterrupted run's metrics, predictor tensors and curves, bit for bit."""
    out = tmp_path / "out"
    args = fit_args(fashion_mnist_root, grey_model, out)
    half = fit_baseline.half_interval
    run = faults.chain("fit")
    held = _interrupt_chain(run, args, tmp_path, out, [(signal.SIGKILL, 1, 0.0), (signal.SIGTERM, 1, half),
                                                       (signal.SIGKILL, 1, half), (signal.SIGKILL, 1, 0.0)],
                            FIT_ITERATIONS)
    run_to_end(args + sets("checkpoint_every=5"), tmp_path)
    assert assert_same_fit(out, fit_baseline.out)["resumed"] is True
    run.completed()


def test_pretrain_killed_and_preempted_at_several_points_resumes_exactly(pretrain_baseline, fashion_mnist_root,
                                                                         tmp_path):
    """The same for training the original network: model weights (BatchNorm statistics included) and curves."""
    out = tmp_path / "out"
    args = pretrain_args(fashion_mnist_root, out)
    half = pretrain_baseline.half_interval
    run = faults.chain("pretrain")
    _interrupt_chain(run, args, tmp_path, out, [(signal.SIGKILL, 1, 0.0), (signal.SIGTERM, 1, half),
                                                (signal.SIGKILL, 2, half)], PRETRAIN_ITERATIONS)
    run_to_end(args, tmp_path)
    assert_same_pretrain(out, pretrain_baseline.out)
    run.completed()


# ------------------------------------------------------------------------------------------------ MLflow


def _mlflow_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("faults")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _runs_in_store(db: Path) -> int:
    if not db.is_file():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return con.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def test_killed_and_resumed_fit_is_one_finished_mlflow_run(fit_baseline, fashion_mnist_root, grey_model, tmp_path):
    """SIGKILL and SIGTERM mid-way: one FINISHED run holding every iteration's loss exactly once (metrics reach
    MLflow with each checkpoint, so the iterations replayed after the SIGKILL are not logged twice), the final
    metrics, params and artefacts."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = fit_args(fashion_mnist_root, grey_model, out, mlflow=uri)
    half = fit_baseline.half_interval
    run = faults.chain("fit with MLflow")
    _interrupt_chain(run, args, tmp_path, out, [(signal.SIGKILL, 1, half), (signal.SIGTERM, 1, half)],
                     FIT_ITERATIONS)
    interrupted = _mlflow_runs(uri)
    assert len(interrupted) == 1, "SIGKILL and SIGTERM mid-way: still one MLflow run"
    run_id = interrupted[0].info.run_id
    assert interrupted[0].data.tags["nern.out"] == str(out.resolve())  # the job's identity is its output directory
    run_to_end(args, tmp_path)
    metrics = assert_same_fit(out, fit_baseline.out)  # tracking does not change the numbers
    run.completed()

    client = MlflowClient(tracking_uri=uri)
    runs = _mlflow_runs(uri)
    assert [r.info.run_id for r in runs] == [run_id], "a resumed fit must stay one MLflow run"
    logged = runs[0]
    assert logged.info.status == "FINISHED"
    by_step: dict[int, list[float]] = {}
    for point in client.get_metric_history(run_id, "train/loss"):
        by_step.setdefault(point.step, []).append(point.value)
    assert sorted(by_step) == list(range(1, FIT_ITERATIONS + 1)), "every iteration's loss is in the run"
    assert not {s: v for s, v in by_step.items() if len(v) > 1}, "a replayed iteration was logged twice"
    assert logged.data.metrics["reconstructed_top1"] == metrics["reconstructed_top1"]
    assert logged.data.metrics["final_loss"] == metrics["final_loss"]
    assert [m.step for m in client.get_metric_history(run_id, "eval/val_top1")] == [12, FIT_ITERATIONS]
    assert [m.step for m in client.get_metric_history(run_id, "eval/test_top1")] == [FIT_ITERATIONS]  # once
    assert logged.data.params["iterations"] == str(FIT_ITERATIONS)
    assert {"metrics.json", "predictor.safetensors"} <= {a.path for a in client.list_artifacts(run_id)}


SHORT = sets("iterations=8", "checkpoint_every=4")  # for the tests that do not compare with the baseline


def test_fit_killed_before_its_first_checkpoint_leaves_one_mlflow_run(fashion_mnist_root, grey_model, tmp_path):
    pytest.importorskip("mlflow")
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    out = tmp_path / "out"
    args = fit_args(fashion_mnist_root, grey_model, out, *SHORT, mlflow=uri)
    run = faults.chain("fit with MLflow, killed before its first checkpoint")
    proc = Nern(args, tmp_path)
    deadline = time.monotonic() + WAIT_S
    while _runs_in_store(db) == 0:  # the MLflow run exists: kill before any checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.output()
        time.sleep(0.01)
    assert proc.signal(signal.SIGKILL) == -signal.SIGKILL
    assert not (out / "checkpoint.pt").exists()
    run.killed("SIGKILL")
    run_to_end(args, tmp_path)
    run.completed()
    runs = _mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]


def test_resume_with_mlflow_may_change_settings_that_do_not_affect_results(fashion_mnist_root, grey_model, tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = fit_args(fashion_mnist_root, grey_model, out, *SHORT, mlflow=uri)
    run = faults.chain("fit with MLflow, resumed with another checkpoint_every")
    code, proc = interrupt(args, tmp_path, out / "checkpoint.pt", writes=1, sig=signal.SIGTERM)
    assert code == 143, proc.output()
    run.killed("SIGTERM")
    again = Nern(args + sets("checkpoint_every=2"), tmp_path)
    assert again.wait() == 0, again.output()
    run.completed()


def test_kill_after_the_outputs_but_before_the_mlflow_run_is_closed_keeps_one_run(fashion_mnist_root, grey_model,
                                                                                  tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    mark = tmp_path / "stalled"
    args = fit_args(fashion_mnist_root, grey_model, out, *SHORT, mlflow=uri)
    run = faults.chain("fit with MLflow, killed while plotting")
    proc = Nern(args, tmp_path, shim=STALL_SHIM, env={"NERN_FAULT_STALL": "curves.png", "NERN_FAULT_MARK": str(mark)})
    wait_for(mark, proc)
    assert (out / "metrics.json").is_file()
    assert proc.signal(signal.SIGKILL) == -signal.SIGKILL
    run.killed("SIGKILL")
    run_to_end(args, tmp_path)
    run.completed()
    runs = _mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]


# ------------------------------------------------------------------------------------------------ atomic outputs


def wait_for(mark: Path, proc: Nern) -> None:
    deadline = time.monotonic() + WAIT_S
    while not mark.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.output()
        time.sleep(0.01)


class KilledMidWrite:
    """A fit SIGKILLed three times with a finished temporary about to be renamed into place (the 2nd checkpoint,
    then predictor.safetensors, then metrics.json), restarted each time, and finally run to the end."""

    def __init__(self, out: Path, seen: list[tuple[str, set[str]]]):
        self.out, self.seen = out, seen


@pytest.fixture(scope="module")
def killed_mid_write(tmp_path_factory, fit_baseline, fashion_mnist_root, grey_model) -> KilledMidWrite:
    work = tmp_path_factory.mktemp("mid-write")
    out = work / "out"
    args = fit_args(fashion_mnist_root, grey_model, out)
    run = faults.chain("fit SIGKILLed mid-write")
    seen = []
    for target, skip in (("checkpoint.pt", 1), ("predictor.safetensors", 0), ("metrics.json", 0)):
        mark = work / f"stalled-{target}"
        proc = Nern(args, work, shim=STALL_SHIM,
                    env={"NERN_FAULT_STALL": target, "NERN_FAULT_SKIP": str(skip), "NERN_FAULT_MARK": str(mark)})
        wait_for(mark, proc)
        assert Path(mark.read_text()).is_file()  # the finished temporary, about to be renamed
        assert proc.signal(signal.SIGKILL) == -signal.SIGKILL
        run.killed("SIGKILL")
        seen.append((target, set(os.listdir(out))))
    run_to_end(args, work)
    assert_same_fit(out, fit_baseline.out)
    run.completed()
    return KilledMidWrite(out, seen)


def test_kill_during_the_final_writes_never_leaves_metrics_without_predictor(killed_mid_write):
    """metrics.json is written last: killed before it is in place, the run is not complete and is redone."""
    for target, files in killed_mid_write.seen:
        assert "metrics.json" not in files, (target, files)
        if target == "metrics.json":
            assert {"predictor.safetensors", "curves.csv"} <= files, files
    assert {"metrics.json", "predictor.safetensors", "curves.csv"} <= set(os.listdir(killed_mid_write.out))


def test_completed_runs_leave_no_temporaries(fit_baseline, pretrain_baseline):
    for out in (fit_baseline.out, pretrain_baseline.out):
        assert temporaries(out) == []
        assert {"metrics.json", "curves.csv", "curves.png"} <= set(os.listdir(out))


def test_no_temporaries_survive_a_run_killed_mid_write(killed_mid_write):
    assert temporaries(killed_mid_write.out) == []
