"""The one training loop of the project: `nern fit` and `nern pretrain` both run through it.

It drives a `Trainable` (one `step()` per iteration; the step owns its optimiser and schedule) for `total`
iterations and does everything around the steps the same way for both stages: the progress bar; periodic
evaluation (and always one of the last iterate); the curves; an atomic checkpoint every `checkpoint_every`
iterations and exact resumption from it; SIGTERM (pre-emption) -> checkpoint -> `Preempted`.

Tracking is buffered: metrics reach the tracker only when a checkpoint is written (and at the end). A run
SIGKILLed between two checkpoints resumes from the older one and replays the iterations after it; their first
metrics died with the process, so every iteration is logged exactly once.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from nern.artifacts import atomic_path
from nern.checkpoint import Preempted, PreemptionGuard, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from nern.errors import NernError

CHECKPOINT_FILE = "checkpoint.pt"


class Trainable(Protocol):
    """What the loop drives. `state_dict()` must hold "iteration" and everything the next step depends on."""

    iteration: int

    def step(self) -> dict[str, float]:
        """One iteration; returns the scalars of its curves row (losses, learning rate, ...)."""

    def evaluate(self) -> dict[str, float]:
        """Measure the current iterate (accuracies, errors)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class LoopPlan:
    """How a run is driven. None of these settings changes a number the run produces."""

    name: str  # progress bar and messages
    total: int
    log_every: int  # a curves row every N iterations (and at the last one)
    eval_every: int = 0  # 0: only the last iterate is evaluated
    eval_from: int = 0  # eval_every counts from this iteration (evaluated itself); none before it but the last
    checkpoint_every: int = 0  # 0: a checkpoint only on SIGTERM
    progress: bool = True
    postfix: tuple[str, ...] = ("loss",)  # the step's scalars shown on the progress bar
    # False (fit): evaluations are their own eval_* columns in curves.csv and eval/* metrics, steps are train/*.
    # True (pretrain): an evaluation adds plain-named columns to its iteration's row (then always written),
    # and the tracker gets the same plain names.
    eval_in_row: bool = False

    def evaluates(self, iteration: int) -> bool:
        if iteration == self.total:
            return True
        since = iteration - self.eval_from
        return bool(self.eval_every) and since >= 0 and since % self.eval_every == 0

    def logs(self, iteration: int, evaluated: bool) -> bool:
        return iteration % self.log_every == 0 or iteration == self.total or (self.eval_in_row and evaluated)

    @property
    def prefixes(self) -> tuple[str, str]:
        """Tracker name prefixes of (step scalars, evaluation results)."""
        return ("", "") if self.eval_in_row else ("train/", "eval/")

    @property
    def eval_column(self) -> str:
        """Prefix of the evaluation columns in curves.csv."""
        return "" if self.eval_in_row else "eval_"

    def checkpoints(self, iteration: int) -> bool:
        return bool(self.checkpoint_every and iteration % self.checkpoint_every == 0)


@dataclass
class History:
    """What a run has recorded so far; part of its checkpoint, so a resumed run continues the same curves."""

    curves: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"curves": self.curves, "evals": self.evals, "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # .get: a pretrain checkpoint written before the shared loop has "seconds" and no evaluations
        self.curves, self.evals = state["curves"], state.get("evals", [])
        self.train_seconds = state.get("train_seconds", state.get("seconds", 0.0))
        self.eval_seconds = state.get("eval_seconds", 0.0)


class MetricBuffer:
    """Tracker points held back until the state that produced them is checkpointed."""

    def __init__(self, tracker: Any = None):
        self.tracker = tracker
        self.pending: list[tuple[dict[str, float], int]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.pending.append((metrics, step))

    def flush(self) -> None:
        while self.pending:  # one at a time: a failed call leaves the rest for the next flush
            metrics, step = self.pending[0]
            self.tracker.log_metrics(metrics, step=step)
            self.pending.pop(0)


class TrainingLoop:
    """Runs a `Trainable` to `plan.total` iterations, resuming from (and writing) `checkpoint`."""

    def __init__(self, task: Trainable, plan: LoopPlan, checkpoint: Path, fingerprint: str, tracker: Any = None):
        self.task, self.plan, self.checkpoint, self.fingerprint = task, plan, Path(checkpoint), fingerprint
        self.history = History()
        self.metrics = MetricBuffer(tracker)
        self._saved_at: int | None = None

    def resume(self) -> bool:
        """Continue from the checkpoint when there is one (of this config: another one is refused)."""
        state = load_checkpoint(self.checkpoint, self.fingerprint)
        if state is None:
            return False
        try:
            self.task.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as exc:  # same config, older code: parameters renamed or reshaped
            raise NernError(f"checkpoint {self.checkpoint} does not fit this version's state ({exc}); it was "
                            "probably written by an older version: delete it to start the run afresh") from exc
        self.history.load_state_dict(state)
        set_rng_state(state["rng"])
        self._saved_at = self.task.iteration
        return True

    def save(self) -> None:
        self.metrics.flush()
        save_checkpoint(self.checkpoint, {"fingerprint": self.fingerprint, **self.task.state_dict(),
                                          **self.history.state_dict(), "rng": rng_state()})
        self._saved_at = self.task.iteration

    def run(self) -> History:
        """Train to the end; the last iterate is evaluated (history.evals[-1]) and, with checkpoints on, saved."""
        plan, task = self.plan, self.task
        bar = tqdm(total=plan.total, initial=task.iteration, desc=plan.name, disable=not plan.progress,
                   dynamic_ncols=True, mininterval=1.0)
        try:
            with PreemptionGuard() as guard:
                while task.iteration < plan.total:
                    self._iterate(bar)
                    if guard.requested or plan.checkpoints(task.iteration):
                        self.save()
                    if guard.requested:
                        raise Preempted(f"stopped by SIGTERM at iteration {task.iteration}; checkpoint saved")
        finally:
            bar.close()
        if not self.history.evals or self.history.evals[-1]["iteration"] != task.iteration:
            self._evaluate(bar)  # a checkpoint written by an older version, without the final evaluation
        if plan.checkpoint_every and self._saved_at != task.iteration:
            self.save()  # flushes the last metrics: a kill from here on replays nothing
        self.metrics.flush()
        return self.history

    def _iterate(self, bar: tqdm) -> None:
        start = time.perf_counter()
        values = self.task.step()
        self.history.train_seconds += time.perf_counter() - start
        it = self.task.iteration
        bar.update(1)
        bar.set_postfix({k: f"{values[k]:.4g}" for k in self.plan.postfix}, refresh=False)
        evaluated = self.plan.evaluates(it)
        if self.plan.logs(it, evaluated):
            self._log_row(it, values)
        if evaluated:
            self._evaluate(bar)

    def _evaluate(self, bar: tqdm) -> dict[str, float]:
        start = time.perf_counter()
        result = {"iteration": self.task.iteration, **self.task.evaluate()}
        self.history.eval_seconds += time.perf_counter() - start
        self.history.evals.append(result)
        self.metrics.log({f"{self.plan.prefixes[1]}{k}": v for k, v in result.items() if k != "iteration"},
                         result["iteration"])
        scores = ", ".join(f"{k} {v:.2f}%" for k, v in result.items() if k.endswith("top1"))
        bar.write(f"[{self.plan.name}] iteration {result['iteration']}/{self.plan.total}: {scores}")
        return result

    def _log_row(self, iteration: int, values: dict[str, float]) -> None:
        self.history.curves.append({"iteration": iteration, **values})
        self.metrics.log({f"{self.plan.prefixes[0]}{k}": v for k, v in values.items()}, iteration)


def write_curves(path: Path, history: History, eval_column: str = "eval_") -> None:
    """curves.csv: one line per iteration with a curves row or an evaluation (its columns `eval_column` + name),
    the columns sorted."""
    rows: dict[int, dict[str, float]] = {}
    for row in history.curves:
        rows.setdefault(int(row["iteration"]), {}).update(row)
    for row in history.evals:
        rows.setdefault(int(row["iteration"]), {}).update(
            {f"{eval_column}{k}": v for k, v in row.items() if k != "iteration"})
    columns = sorted({k for r in rows.values() for k in r} - {"iteration"})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["iteration", *columns])
        for it in sorted(rows):
            writer.writerow([it, *(rows[it].get(c, "") for c in columns)])


def clear_resume_state(out_dir: str | Path) -> None:
    """After a run is complete AND logged: nothing left to resume, so a rerun starts afresh."""
    (Path(out_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
