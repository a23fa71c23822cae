"""Quantisation-aware predictor: learnt step sizes and straight-through rounding (LSQ, Esser et al., ICLR 2020).

Post-training quantisation below 8 bits destroys a fitted predictor (issue #15: ResNet20 at int6 37.6%, int4
10.0%): every kernel is a function of every predictor weight, so rounding errors add up in every layer of the
reconstructed network. Training through the rounding fixes that. Each Linear weight of the predictor gets a
parametrisation (`torch.nn.utils.parametrize`) that returns

    w_q = round(clamp(w / s, -L, L)) * s,      L = 2**(bits-1) - 1,  s: one learnt step per output row,

with the rounding passed straight through in the backward pass, s learnt as log s (always positive, relative
updates) and its gradient scaled by 1 / sqrt(numel * L) (LSQ's scaling), s a float16 value. The fit gives the log
steps an optimiser group of their own (`optim.step_lr_scale` x the weights' lr, no weight decay). The quantisers serve twice:
a whole fit through them (`predictor.quantise_bits`, attached by `nern.fit.Fitter` before the first step), and a
quantisation-aware fine-tune of a float fit (`nern compress --qat-bits`, `nern.compress.finetune_predictor`).
On public ResNet20 only the first works: a 4-bit fine-tune starts at chance and stays there, a 4-bit fit reaches
~77% (docs/measurements/codec). Either way `learnt_steps` gives the steps, and the codec stores exactly the
integers the predictor was trained with (`nern.codec.encode_tensor(scale=...)`). Biases stay float, like every
1-D tensor under `intN`. The same quantisers (one step per conv filter there) train the ORIGINAL network's weights
for compress's equal-budget baseline (`attach_weight_quantisers`, `nern.original_qat`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nern.errors import NernError

MIN_BITS, MAX_BITS = 2, 8
QUANTISABLE_TYPES = (nn.Linear, nn.Conv2d)
HALF_MIN_NORMAL = 2.0 ** -14  # smaller steps stay float32 (subnormal float16 loses precision)


def _round_straight_through(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _half_precision_straight_through(step: Tensor) -> Tensor:
    """The step rounded to the nearest float16 (where that is a normal float16), its gradient passed through:
    the file then stores the steps losslessly in half the bytes (`nern.codec` keeps fp32 where they are not)."""
    rounded = torch.where(step >= HALF_MIN_NORMAL, step.half().float(), step)
    return step + (rounded - step).detach()


def _scale_gradient(x: Tensor, factor: float) -> Tensor:
    """x in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    return x * factor + (x - x * factor).detach()


class LearntStepQuantiser(nn.Module):
    """Fake quantisation of one weight matrix to `bits` bits with a learnt step per output row."""

    def __init__(self, weight: Tensor, bits: int):
        super().__init__()
        if not MIN_BITS <= bits <= MAX_BITS:
            raise NernError(f"quantisation-aware bits {bits} is outside [{MIN_BITS}, {MAX_BITS}]; pass e.g. 4")
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1
        self.gradient_factor = 1.0 / math.sqrt(weight[0].numel() * self.levels)
        # the step is learnt as its logarithm: LSQ's raw step under an Adam-type optimiser moves by ~lr per update
        # whatever its size, and at 6 bits (steps ~0.015, rec lr 2e-2) steps crossed zero, leaving 25-64 of 160
        # rows per layer dead (clamped to ~0) and the fit at 22%; in log space every update is relative
        self.log_step = nn.Parameter(initial_steps(weight.detach(), self.levels).log())

    def effective_step(self) -> Tensor:
        """The step per row the forward pass uses (and the file stores): positive, float16 where it can be."""
        return _half_precision_straight_through(_scale_gradient(self.log_step, self.gradient_factor).exp())

    def forward(self, weight: Tensor) -> Tensor:
        step = self.effective_step().reshape(-1, *([1] * (weight.dim() - 1)))  # a row: a Linear's row, a conv's filter
        return _round_straight_through((weight / step).clamp(-self.levels, self.levels)) * step


def initial_steps(weight: Tensor, levels: int) -> Tensor:
    """The step per row that minimises the row's rounding-plus-clipping error, searched over a grid of clip
    fractions of max |w|: LSQ's 2 mean|w| / sqrt(L) start clips far too much at 4 bits for a trained layer."""
    rows = weight.float().reshape(weight.shape[0], -1)
    peak = rows.abs().amax(dim=1).clamp_min(1e-8)
    best_err = torch.full_like(peak, math.inf)
    best = peak / levels
    for fraction in torch.linspace(0.3, 1.0, 15):
        step = (peak * fraction / levels).unsqueeze(1)
        err = ((torch.round(rows / step).clamp(-levels, levels) * step - rows) ** 2).sum(dim=1)
        better = err < best_err
        best = torch.where(better, step.squeeze(1), best)
        best_err = torch.where(better, err, best_err)
    return best


def quantisable_linears(predictor: nn.Module) -> list[nn.Linear]:
    return [m for m in predictor.modules() if isinstance(m, nn.Linear)]


def attach_quantisers(predictor: nn.Module, bits: int) -> None:
    """Parametrise every Linear weight of `predictor` in place; its parameters then include the steps."""
    attach_weight_quantisers(predictor, bits, lambda name, module: isinstance(module, nn.Linear),
                             "the predictor already carries quantisers; attach them once")


def attach_weight_quantisers(network: nn.Module, bits: int, select: Callable[[str, nn.Module], bool],
                             attached: str = "the network already carries quantisers; attach them once") -> list[str]:
    """Parametrise the weight of every Conv2d/Linear of `network` that `select(name, module)` picks, in place (the
    original network's baseline of `nern compress` quantises its convs, and optionally its FC, so); returns the
    names of the quantised weights."""
    chosen = [(name, m) for name, m in network.named_modules()
              if isinstance(m, QUANTISABLE_TYPES) and select(name, m)]
    for _, module in chosen:
        if parametrize.is_parametrized(module, "weight"):
            raise NernError(attached)
        parametrize.register_parametrization(module, "weight", LearntStepQuantiser(module.weight, bits))
    return [f"{name}.weight" for name, _ in chosen]


def _quantised_modules(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d/Linear whose weight goes through a quantiser, in registration order."""
    return [(name, m) for name, m in network.named_modules()
            if isinstance(m, QUANTISABLE_TYPES) and parametrize.is_parametrized(m, "weight")]


def learnt_step_parameters(predictor: nn.Module) -> list[nn.Parameter]:
    """The quantisers' own parameters (their log steps), for an optimiser group of their own."""
    return [m.log_step for m in predictor.modules() if isinstance(m, LearntStepQuantiser)]


def learnt_steps(predictor: nn.Module) -> dict[str, Tensor]:
    """Each quantised weight's name in the plain module's state dict (e.g. "0.weight") -> its steps."""
    steps = {}
    for name, module in _quantised_modules(predictor):
        quantiser = module.parametrizations.weight[0]
        steps[f"{name}.weight"] = quantiser.effective_step().detach().cpu().clone()
    return steps


def plain_state(predictor: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The predictor's state dict under its plain names (quantised weights: integers times steps) and the steps,
    leaving `predictor` as it is: what a predictor file stores, so that it loads into a plain `Predictor`."""
    plain = copy.deepcopy(predictor)
    steps = learnt_steps(plain)
    detach_quantisers(plain)
    return {k: v.detach().clone() for k, v in plain.state_dict().items()}, steps


def detach_quantisers(predictor: nn.Module) -> None:
    """Replace each parametrised weight by its quantised value (integers times steps), in place."""
    for _, module in _quantised_modules(predictor):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
