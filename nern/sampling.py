"""Which predicted kernels carry gradient each iteration (docs/METHOD.md §5).

Every iteration predicts all kernels (the full reconstructed network runs forward); the sampler picks the
rows through which the loss gradient reaches the predictor. `random_weighted_batch` ("magnitude
oriented", used in all released runs): with probability `uniform_prob` a uniform subset of B without
replacement, else B i.i.d. draws WITH replacement, proportional to each original kernel's L2 norm.
"""

from __future__ import annotations

from typing import Any

import torch

from nern.config import SAMPLING_METHODS
from nern.errors import NernError


class KernelSampler:
    def __init__(self, method: str, batch: int, offsets: list[int], kernel_norms: torch.Tensor,
                 uniform_prob: float = 0.8, seed: int = 0):
        if method not in SAMPLING_METHODS:
            raise NernError(f"unknown sampling method '{method}'; choose one of {', '.join(SAMPLING_METHODS)}")
        self.method = method
        self.batch = batch
        self.offsets = offsets
        self.num_kernels = offsets[-1]
        self.num_layers = len(offsets) - 1
        self.uniform_prob = uniform_prob
        self.weights = kernel_norms.detach().double().cpu().clamp_min(0) + 1e-12
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0

    def sample(self) -> torch.Tensor | None:
        """Indices of the kernels with gradient this iteration; None means all of them."""
        out = getattr(self, f"_{self.method}")()
        self.step += 1
        return out

    def _all(self) -> None:
        return None

    def _uniform(self) -> torch.Tensor | None:
        if self.batch >= self.num_kernels:
            return None
        return torch.randperm(self.num_kernels, generator=self.generator)[: self.batch]

    def _random_batch(self) -> torch.Tensor | None:
        return self._uniform()

    def _random_batch_without_replacement(self) -> torch.Tensor | None:
        if self.batch >= self.num_kernels:
            return None
        if self._cursor >= len(self._order):
            self._order = torch.randperm(self.num_kernels, generator=self.generator)
            self._cursor = 0
        chunk = self._order[self._cursor : self._cursor + self.batch]
        self._cursor += self.batch
        return chunk

    def _layer(self, index: int) -> torch.Tensor:
        return torch.arange(self.offsets[index], self.offsets[index + 1])

    def _sequential_layer(self) -> torch.Tensor:
        return self._layer(self.step % self.num_layers)

    def _random_layer(self) -> torch.Tensor:
        return self._layer(int(torch.randint(self.num_layers, (1,), generator=self.generator)))

    def _random_weighted_batch(self) -> torch.Tensor | None:
        if float(torch.rand((), generator=self.generator)) < self.uniform_prob:
            return self._uniform()
        return torch.multinomial(self.weights, self.batch, replacement=True, generator=self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "generator": self.generator.get_state(), "order": self._order,
                "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.generator.set_state(state["generator"])
        self._order = state["order"]
        self._cursor = state["cursor"]
