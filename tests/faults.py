"""Fault-injection bookkeeping: a pytest plugin that adds up, over one session, what the fault tests survived.

At the end of the session it prints ONE line:

    fault-injection: kills survived 7, server restarts survived 3, bad inputs tried 24, concurrent runs logged 8,
    runs lost 0

- kills survived: SIGKILL/SIGTERM interruptions of a real `nern fit`/`nern pretrain` process (or, in the chaos
  run of tests/test_chaos.py, of any job of the tiny workflow) whose restarts then completed with the
  uninterrupted run's results; a test reports them through `chain()`:

      run = faults.chain("fit sigkill")
      ...; run.killed("SIGKILL")   # after each interruption
      run.completed()              # once the restarted run finished and was verified

- server restarts survived: restarts of a SIGKILLed MLflow tracking server after which the pipeline (or the
  concurrent writers) ended with every run in the store (tests/test_mlflow_server.py), through
  `record_server_restarts(n)`, called once the test has verified everything;
- bad inputs tried: passed tests named `test_bad_input[...]` or `test_disk_full...` (tests/test_cli.py);
- concurrent runs logged: FINISHED MLflow runs the concurrent-logging test left in its store
  (tests/test_tracking.py::test_eight_processes_share_one_fresh_sqlite_store), or the value a test records
  with `record_property("concurrent_runs", n)`;
- runs lost: interrupted runs that never completed (a chain without `completed()`) plus concurrent writers
  whose MLflow run is missing or not FINISHED. It must be 0.

Fault tests carry the `fault` marker (`pytest -m fault` selects them); the plugin adds it to the tests it
counts in other files. Tests that are expected to fail (xfail: a known, not yet handled fault) do not count.
Registered from tests/conftest.py with `pytest_plugins = ["faults"]`. Not xdist-aware: run it in one process.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BAD_INPUT_PREFIXES = ("test_bad_input", "test_disk_full")
CONCURRENCY_TESTS = ("test_eight_processes_share_one_fresh_sqlite_store",)
CONCURRENT_PROPERTY = "concurrent_runs"


@dataclass
class RunChain:
    """One run that a test interrupts and restarts until it completes."""

    name: str
    nodeid: str
    kills: list[str] = field(default_factory=list)
    done: bool = False

    def killed(self, how: str) -> None:
        self.kills.append(how)

    def completed(self) -> None:
        self.done = True


@dataclass
class Ledger:
    chains: list[RunChain] = field(default_factory=list)
    bad_inputs: int = 0
    server_restarts: int = 0
    concurrent_logged: int = 0
    concurrent_lost: int = 0
    fault_tests_run: int = 0
    kinds: dict[str, str] = field(default_factory=dict)  # nodeid -> "bad_input" | "concurrency" | "fault"

    @property
    def kills_survived(self) -> int:
        return sum(len(c.kills) for c in self.chains if c.done)

    @property
    def runs_lost(self) -> int:
        return sum(1 for c in self.chains if not c.done) + self.concurrent_lost

    def line(self) -> str:
        return (f"fault-injection: kills survived {self.kills_survived}, server restarts survived "
                f"{self.server_restarts}, bad inputs tried {self.bad_inputs}, "
                f"concurrent runs logged {self.concurrent_logged}, runs lost {self.runs_lost}")


LEDGER = Ledger()


def chain(name: str) -> RunChain:
    """Register a run that the calling test is about to interrupt; call `.completed()` once it is verified."""
    nodeid = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    run = RunChain(name, nodeid)
    LEDGER.chains.append(run)
    return run


def record_server_restarts(restarts: int) -> None:
    """For the tests that restart a killed tracking server: call once everything is verified."""
    LEDGER.server_restarts += restarts


def record_concurrent(logged: int, expected: int) -> None:
    """For tests that count their concurrent writers themselves."""
    LEDGER.concurrent_logged += logged
    LEDGER.concurrent_lost += max(0, expected - logged)


# ------------------------------------------------------------------------------------------ hooks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fault: fault-injection test (kills, bad inputs, concurrent writers); counted in the summary line"
    )


def _kind(item: pytest.Item) -> str | None:
    name = getattr(item, "originalname", None) or item.name
    if name.startswith(BAD_INPUT_PREFIXES):
        return "bad_input"
    if name in CONCURRENCY_TESTS:
        return "concurrency"
    if item.get_closest_marker("fault") is not None:
        return "fault"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = _kind(item)
        if kind is None:
            continue
        LEDGER.kinds[item.nodeid] = kind
        if item.get_closest_marker("fault") is None:
            item.add_marker(pytest.mark.fault)


def _finished_runs(tmp_path: Path) -> tuple[int, int]:
    """(runs, FINISHED runs) in the MLflow SQLite stores under `tmp_path`, read without MLflow."""
    total = finished = 0
    for db in tmp_path.rglob("mlflow.db"):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            for (status,) in con.execute("SELECT status FROM runs WHERE lifecycle_stage = 'active'"):
                total += 1
                finished += status == "FINISHED"
        except sqlite3.DatabaseError:
            pass
        finally:
            con.close()
    return total, finished


def _count_concurrency(item: pytest.Item) -> None:
    recorded = [v for k, v in item.user_properties if k == CONCURRENT_PROPERTY]
    if recorded:
        LEDGER.concurrent_logged += int(recorded[-1])
        return
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if tmp_path is None:
        return
    total, finished = _finished_runs(Path(tmp_path))
    writers = len(list(Path(tmp_path).glob("*.ready*"))) or total  # each worker touches go.ready<i> first
    LEDGER.concurrent_logged += finished
    LEDGER.concurrent_lost += max(0, writers - finished)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call":
        return
    kind = LEDGER.kinds.get(item.nodeid)
    if kind is None:
        return
    LEDGER.fault_tests_run += 1
    if hasattr(report, "wasxfail"):  # a known fault: neither survived nor lost
        LEDGER.chains = [c for c in LEDGER.chains if c.nodeid != item.nodeid]
        return
    if kind == "bad_input" and report.passed:
        LEDGER.bad_inputs += 1
    elif kind == "concurrency":
        _count_concurrency(item)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not LEDGER.fault_tests_run and not LEDGER.chains:
        return
    terminalreporter.write_line(LEDGER.line(), bold=True, red=LEDGER.runs_lost > 0)
