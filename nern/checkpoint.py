"""Resumable runs: atomic training checkpoints and a SIGTERM guard for pre-emption.

A checkpoint holds everything the next iteration depends on (model/predictor, optimiser, scheduler,
sampler, data stream, RNG state, curves), so a run killed at any point and restarted ends with the same
numbers as an uninterrupted one (nern/loop.py writes and reads them). It also stores a fingerprint of the config: resuming a
different experiment from a stale checkpoint is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import signal
import types
from pathlib import Path
from typing import Any

import torch

from nern.artifacts import atomic_path
from nern.errors import NernError


def fingerprint(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """Hash of the settings that change results; keys in `ignore` (progress bars, eval cadence) do not."""
    kept = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """Content hash of the run's inputs (original weights, permutations): a retrained original network must
    not be resumed into from the checkpoint of a fit to the old one."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The saved state, or None when there is none; a checkpoint of another config is a user error."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated file cannot happen through atomic_path, but a copied one can
        raise NernError(f"checkpoint {path} is unreadable ({exc}); delete it to start the run afresh") from exc
    if state.get("fingerprint") != expected_fingerprint:
        raise NernError(
            f"checkpoint {path} belongs to a run with another config; delete it or choose another output directory"
        )
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Preempted(Exception):
    """Raised after the final checkpoint was written in response to SIGTERM (Slurm pre-emption)."""


class PreemptionGuard:
    """Turns SIGTERM into a flag the training loop polls, so the last step finishes and is checkpointed."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> "PreemptionGuard":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
