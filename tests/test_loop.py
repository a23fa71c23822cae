"""The shared training loop on a toy task whose every step draws from the global RNG: cadences, exact resumption
after a kill between checkpoints, SIGTERM, and tracker points that reach the tracker once each."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from nern.checkpoint import Preempted
from nern.errors import NernError
from nern.loop import History, LoopPlan, TrainingLoop, clear_resume_state, write_curves

from helpers import Recorder

TRUE_W = torch.tensor([1.0, -2.0, 0.5])


class Killed(Exception):
    """Stands for SIGKILL: the process dies mid-run, nothing is saved."""


class Regression:
    """Noisy linear regression by SGD with momentum; batches come from the global RNG."""

    def __init__(self, die_at: int | None = None, on_step: Any = None):
        self.w = torch.zeros(3, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.w], lr=0.05, momentum=0.9)
        self.iteration = 0
        self.die_at, self.on_step = die_at, on_step

    def step(self) -> dict[str, float]:
        if self.iteration == self.die_at:
            raise Killed
        if self.on_step:
            self.on_step(self.iteration)
        x = torch.randn(8, 3)
        y = x @ TRUE_W + 0.1 * torch.randn(8)
        loss = ((x @ self.w - y) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return {"loss": loss.item(), "lr": 0.05}

    def evaluate(self) -> dict[str, float]:
        return {"err": float((self.w.detach() - TRUE_W).norm()), "fake_top1": 50.0}

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "w": self.w.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.optimizer.load_state_dict(state["optimizer"])


PLAN = LoopPlan("toy", total=20, log_every=1, eval_every=5, checkpoint_every=6, progress=False)


def run(task: Regression, out: Path, plan: LoopPlan = PLAN, tracker: Any = None) -> tuple[TrainingLoop, History]:
    torch.manual_seed(0)
    loop = TrainingLoop(task, plan, out / "checkpoint.pt", "fp", tracker)
    loop.resume()
    return loop, loop.run()


def test_evaluations_count_from_eval_from_which_is_evaluated_itself():
    """A fit's reconstruction-only phase is evaluated once, at its end; eval_every counts from there."""
    plan = LoopPlan("toy", total=12, log_every=1, eval_every=3, eval_from=5, progress=False)
    assert [i for i in range(1, 13) if plan.evaluates(i)] == [5, 8, 11, 12]
    assert [i for i in range(1, 13) if LoopPlan("toy", 12, 1, eval_every=0, eval_from=5).evaluates(i)] == [12]
    assert [i for i in range(1, 13) if LoopPlan("toy", 12, 1, eval_every=4).evaluates(i)] == [4, 8, 12]


def test_cadences_and_names(tmp_path):
    plan = LoopPlan("toy", total=10, log_every=3, eval_every=4, progress=False)
    tracker = Recorder()
    _, history = run(Regression(), tmp_path, plan, tracker)
    assert [r["iteration"] for r in history.curves] == [3, 6, 9, 10]
    assert [r["iteration"] for r in history.evals] == [4, 8, 10]  # the last iterate once, not twice
    assert {name for name, _, _ in tracker.points} == {"train/loss", "train/lr", "eval/err", "eval/fake_top1"}
    assert not (tmp_path / "checkpoint.pt").exists()  # checkpoint_every=0: none written

    in_row = LoopPlan("toy", total=10, log_every=3, eval_every=4, progress=False, eval_in_row=True)
    tracker = Recorder()
    _, history = run(Regression(), tmp_path, in_row, tracker)
    assert [r["iteration"] for r in history.curves] == [3, 4, 6, 8, 9, 10]  # a row at every evaluation
    assert {name for name, _, _ in tracker.points} == {"loss", "lr", "err", "fake_top1"}
    write_curves(tmp_path / "curves.csv", history, eval_column="")
    with open(tmp_path / "curves.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["iteration", "err", "fake_top1", "loss", "lr"]
    assert [r["err"] != "" for r in rows] == [False, True, False, True, False, True]


def test_killed_between_checkpoints_resumes_exactly_and_logs_every_point_once(tmp_path):
    straight = Recorder()
    reference, expected = run(Regression(), tmp_path / "straight", tracker=straight)

    first = Recorder()
    with pytest.raises(Killed):
        run(Regression(die_at=15), tmp_path / "killed", tracker=first)  # the last checkpoint is at 12
    assert max(step for _, step, _ in first.points) == 12  # 13-15 died unlogged with the process
    second = Recorder()
    loop, history = run(Regression(), tmp_path / "killed", tracker=second)

    assert torch.equal(loop.task.w, reference.task.w)
    assert history.curves == expected.curves and history.evals == expected.evals
    logged = first.points + second.points
    assert len(logged) == len({(name, step) for name, step, _ in logged}), "a replayed point was logged twice"
    assert sorted(logged) == sorted(straight.points)


def test_finished_run_leaves_a_checkpoint_of_its_end_until_cleared(tmp_path):
    """After the loop every point is flushed and checkpointed: a kill before the outputs are written replays
    nothing (20 is not a multiple of checkpoint_every)."""
    loop, _ = run(Regression(), tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 20 and state["evals"][-1]["iteration"] == 20
    again = Recorder()
    run(Regression(), tmp_path, tracker=again)
    assert again.points == []  # resumed at the end: nothing replayed, nothing logged twice
    clear_resume_state(tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_checkpoint_of_an_older_state_layout_is_refused_with_advice(tmp_path):
    """Same config, older code (a parameter renamed, as the quantiser's step became log_step): a NernError naming
    the checkpoint and the way out, not torch's missing-key error."""
    with pytest.raises(Killed):
        run(Regression(die_at=15), tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    state["step"] = state.pop("w")
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(NernError, match=r"checkpoint\.pt does not fit this version's state.*delete it"):
        run(Regression(), tmp_path)


def test_sigterm_saves_then_raises_preempted_and_the_rerun_matches(tmp_path):
    _, expected = run(Regression(), tmp_path / "straight")
    term = lambda it: os.kill(os.getpid(), signal.SIGTERM) if it == 7 else None  # noqa: E731
    tracker = Recorder()
    with pytest.raises(Preempted, match="iteration 8"):
        run(Regression(on_step=term), tmp_path / "term", tracker=tracker)
    assert torch.load(tmp_path / "term" / "checkpoint.pt", weights_only=False)["iteration"] == 8
    assert max(step for _, step, _ in tracker.points) == 8  # flushed with the checkpoint
    _, history = run(Regression(), tmp_path / "term")
    assert history.curves == expected.curves and history.evals == expected.evals
