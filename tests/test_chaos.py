"""Chaos run: the tiny workflow (config/test.yaml) with random jobs SIGKILLed at random moments loses nothing.

The tiny preset, trimmed to one chain per stage, runs twice in one temporary directory: once uninterrupted (the
reference), then while a seeded RNG gives each new `nern` job of that Snakemake a kill moment drawn uniformly
over the time the same job took in the reference run (so start-up, training, checkpoint writes, the MLflow calls
and the final writes all fall inside the window) and SIGKILLs it then; Snakemake is rerun until it completes.
The local profile retries a failed job once and reruns incomplete outputs; every stage resumes from its
checkpoint (kept in its output directory) or starts over. The chaos run must end with the reference's tables
byte for byte, every metrics.json result equal (timing fields aside), and one FINISHED MLflow run per job, none
left RUNNING. Its kills are counted in the fault-injection summary line (tests/faults.py). Checkpoints are
switched on here (test.yaml has none) so that kills hit resumes too. NERN_CHAOS_SEED picks other kill moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

import faults
from test_workflow import REPO, SNAKEFILE, TRACKED_RULES, job_counts, one_chain_config, output, run_in, tail

pytestmark = [pytest.mark.slow, pytest.mark.fault]

CHAOS_SEED = int(os.environ.get("NERN_CHAOS_SEED", "13"))  # another seed explores other kill moments
KILLS, MIN_KILLS = 7, 5  # kills aimed at; the fewest that count as a chaos run (victims may end first)
KILL_PROBABILITY = 0.8  # of each new job (a restarted job is a new one)
KILLS_PER_JOB = 2  # so that the kills spread over the stages instead of all hitting the first jobs
DEFAULT_LIFE_S = 20.0  # when the reference run left no benchmark files at all
MAX_PASSES = 10  # snakemake invocations in the chaos run (a job killed twice in one pass fails that pass)
RUN_TIMEOUT_S = 2400  # generous: only reached when something hangs (or on a heavily shared machine)
# Fields that measure time or say whether the run resumed: everything else must be equal.
NON_RESULT_FIELDS = {"wall_seconds", "train_seconds", "eval_seconds", "seconds_per_iteration", "resumed"}
RUNNING = "RUNNING"


def chaos_config(path: Path) -> Path:
    """The tiny preset trimmed to one chain per stage (pretrain, 2 permutations, 2 fits, compress, importance,
    tables: 8 jobs, run twice), with checkpoints every few iterations (pretrain ~38 iterations, fits 16)."""
    config = one_chain_config()
    network = config["networks"][0]
    network["original"]["set"]["checkpoint_every"] = 8
    network["fit"]["checkpoint_every"] = 4
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------------------------------------ killing


@dataclass
class Kill:
    command: str  # nern subcommand and output directory
    age_s: float  # how long the job had run when it was killed
    life_s: float  # how long the same job took in the reference run

    def __str__(self) -> str:
        return f"{self.command} after {self.age_s:.1f} s of {self.life_s:.0f} s"


def nern_jobs(root_pid: int) -> list[psutil.Process]:
    """The `python -m nern ...` processes below `root_pid` (this test's Snakemake only, never another's)."""
    try:
        below = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    jobs = []
    for proc in below:
        try:
            argv = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if any(a == "-m" and b == "nern" for a, b in zip(argv, argv[1:])):
            jobs.append(proc)
    return sorted(jobs, key=lambda p: p.pid)


def job_out(argv: list[str]) -> str:
    """The job's `--out` (a directory, or the permutation file)."""
    return argv[argv.index("--out") + 1] if "--out" in argv else ""


def lifetimes(reference: Path) -> dict[str, float]:
    """Wall seconds of each job of the reference run, from Snakemake's benchmark files, keyed by the path
    below results/<preset>/ (= the job's output directory, as for the benchmark file)."""
    root = reference / "benchmarks" / "test"
    found = {}
    for tsv in root.rglob("*.tsv"):
        rows = tsv.read_text().splitlines()
        if len(rows) > 1:
            found[str(tsv.relative_to(root).with_suffix(""))] = float(rows[-1].split("\t")[0])
    return found


def life_of(out: str, lives: dict[str, float]) -> float:
    """The reference lifetime of the job writing `out` (a permutation job's out is its .safetensors file)."""
    key = out.split("results/test/", 1)[-1].rstrip("/").removesuffix(".safetensors")
    if key in lives:
        return lives[key]
    return statistics.median(lives.values()) if lives else DEFAULT_LIFE_S


class Killer:
    """Gives each new job of the Snakemake, with probability KILL_PROBABILITY, a kill moment drawn uniformly over
    the time the same job took in the reference run, and SIGKILLs it then; KILLS kills in all, at most
    KILLS_PER_JOB per job."""

    def __init__(self, rng: random.Random, lives: dict[str, float]):
        self.rng, self.lives = rng, lives
        self.seen: set[int] = set()
        self.pending: dict[int, tuple[psutil.Process, float, str, float]] = {}  # pid -> (proc, kill at, job, life)
        self.kills: list[Kill] = []

    def poll(self, snake: subprocess.Popen) -> None:
        for proc in nern_jobs(snake.pid):
            if proc.pid in self.seen:
                continue
            self.seen.add(proc.pid)
            if len(self.kills) + len(self.pending) >= KILLS or self.rng.random() >= KILL_PROBABILITY:
                continue
            try:
                argv, born = proc.cmdline(), proc.create_time()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            out = job_out(argv)
            life = life_of(out, self.lives)
            job = f"{argv[argv.index('nern') + 1]} {out}".strip()
            if sum(k.command == job for k in self.kills) >= KILLS_PER_JOB:
                continue
            self.pending[proc.pid] = (proc, born + self.rng.uniform(0.0, life), job, life)
        for pid, (proc, at, job, life) in list(self.pending.items()):
            try:
                if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                    del self.pending[pid]  # it ended first: another job takes its place
                elif time.time() >= at:
                    age = time.time() - proc.create_time()
                    proc.send_signal(signal.SIGKILL)
                    del self.pending[pid]
                    self.kills.append(Kill(job, age, life))
                    print(f"chaos: SIGKILL {self.kills[-1]}", flush=True)
            except psutil.NoSuchProcess:
                self.pending.pop(pid, None)


def start_snakemake(workdir: Path, configfile: Path) -> subprocess.Popen:
    """As test_workflow.run_in, but returns at once, so jobs can be killed while it runs."""
    command = ["timeout", "-s", "INT", "-k", "30", str(RUN_TIMEOUT_S), sys.executable, "-m", "snakemake", "all",
               "--snakefile", str(SNAKEFILE), "--directory", str(workdir), "--configfile", str(configfile),
               "--profile", str(REPO / "workflow" / "profiles" / "local")]
    log = open(workdir / f"snakemake-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def chaos_run(workdir: Path, configfile: Path, chain: faults.RunChain, lives: dict[str, float]) -> list[Kill]:
    """Run the workflow, killing jobs on the way, and rerun it until it completes."""
    killer = Killer(random.Random(CHAOS_SEED), lives)
    for _ in range(MAX_PASSES):
        snake = start_snakemake(workdir, configfile)
        try:
            while snake.poll() is None:
                killer.poll(snake)
                time.sleep(0.02)
        finally:
            if snake.poll() is None:
                snake.kill()
                snake.wait()
        killer.pending.clear()
        if snake.returncode == 0:
            break
    else:
        pytest.fail(f"the workflow did not complete in {MAX_PASSES} passes; kills: {[str(k) for k in killer.kills]}")
    for _ in killer.kills:
        chain.killed("SIGKILL")
    assert len(killer.kills) >= MIN_KILLS, f"only {len(killer.kills)} kills: {[str(k) for k in killer.kills]}"
    return killer.kills


# ------------------------------------------------------------------------------------------------ comparing


def tables(workdir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((workdir / "results" / "tables" / "test").glob("*.csv"))}


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in NON_RESULT_FIELDS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def metrics_results(workdir: Path) -> dict[str, dict]:
    results = workdir / "results" / "test"
    return {str(p.relative_to(results)): without_timing(json.loads(p.read_text()))
            for p in sorted(results.rglob("metrics.json"))}


def mlflow_jobs(workdir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """((rule, run name) of every FINISHED job run, sorted; names of the runs still RUNNING). Every job's run
    is a child of the preset's one parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("test")
    assert experiment is not None, "no MLflow experiment 'test'"
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    parents = [r for r in runs if "nern.parent" in r.data.tags]
    assert len(parents) == 1, f"one parent run for the preset, not {len(parents)}"
    runs = [r for r in runs if r not in parents]
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs} == {parents[0].info.run_id}, "a job outside the parent"
    finished = sorted((r.data.tags.get("rule", "?"), r.info.run_name) for r in runs if r.info.status == "FINISHED")
    running = [f"{r.info.run_name} ({r.info.run_id})" for r in runs if r.info.status == RUNNING]
    return finished, running


def leftovers(workdir: Path) -> list[str]:
    """Checkpoints and temporaries a finished workflow must not leave behind."""
    results = workdir / "results"
    return sorted(str(p.relative_to(results)) for pattern in ("checkpoint.pt", "*.tmp", ".*.tmp")
                  for p in results.rglob(pattern))


def check_same_results(reference: Path, chaos: Path, tracked_jobs: int, kills: int) -> None:
    """The chaos run's tables, metrics and MLflow runs are the reference's (`kills`: how many jobs were killed)."""
    assert tables(reference), "the reference run wrote no tables"
    assert tables(chaos) == tables(reference)
    want = metrics_results(reference)
    got = metrics_results(chaos)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    finished, running = mlflow_jobs(chaos)
    finished_ref, running_ref = mlflow_jobs(reference)
    assert not running and not running_ref, f"runs left RUNNING: {running or running_ref}"
    assert len(set(finished_ref)) == len(finished_ref) == tracked_jobs
    assert leftovers(chaos) == []
    assert finished == finished_ref, "not exactly one FINISHED MLflow run per job"


# ------------------------------------------------------------------------------------------------ the test


def test_tiny_workflow_survives_random_sigkills_with_identical_results(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    configfile = chaos_config(tmp_path / "chaos.yaml")
    reference, chaos = tmp_path / "reference", tmp_path / "chaos"
    reference.mkdir()
    chaos.mkdir()

    start = time.monotonic()
    done = run_in(reference, configfile, "local", RUN_TIMEOUT_S)
    reference_s = time.monotonic() - start
    assert done.returncode == 0, tail(done)
    counts = job_counts(output(done))

    chain = faults.chain("chaos: tiny workflow")
    start = time.monotonic()
    kills = chaos_run(chaos, configfile, chain, lifetimes(reference))
    chaos_s = time.monotonic() - start
    print(f"chaos run (seed {CHAOS_SEED}): reference {reference_s:.0f} s, chaos {chaos_s:.0f} s, "
          f"{len(kills)} kills: " + "; ".join(map(str, kills)))

    check_same_results(reference, chaos, sum(counts.get(rule, 0) for rule in TRACKED_RULES), len(kills))
    chain.completed()
