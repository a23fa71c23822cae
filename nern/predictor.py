"""The predictor (docs/METHOD.md §3): a plain MLP from a coordinate embedding to one kernel.

Linear(6L -> h), ReLU, (depth - 2) x [Linear(h -> h), ReLU], Linear(h -> k*k); no residuals, no
normalisation, no output activation. With L = 40 and depth 5 it has 3h^2 + 253h + 9 parameters.
"""

from __future__ import annotations

from torch import nn


class Predictor(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, depth: int = 5, kernel_size: int = 3, init: str = "default"):
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, kernel_size * kernel_size))
        super().__init__(*layers)
        self.kernel_size = kernel_size
        if init == "variance":
            variance_preserving_init(self)


def variance_preserving_init(mlp: nn.Module) -> None:
    """He-normal weights and zero biases: keeps activation variance through the ReLU stack, so deep or wide
    predictors start with outputs of a sensible scale instead of shrinking towards zero."""
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        last = i == len(linears) - 1
        nn.init.kaiming_normal_(lin.weight, nonlinearity="linear" if last else "relu")
        nn.init.zeros_(lin.bias)


def predictor_params(in_dim: int, hidden: int, depth: int = 5, kernel_size: int = 3) -> int:
    """Closed form of the parameter count (checked against the module in the tests)."""
    out = kernel_size * kernel_size
    return (in_dim + 1) * hidden + (depth - 2) * (hidden + 1) * hidden + (hidden + 1) * out
