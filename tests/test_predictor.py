import pytest
import torch

from nern.models import count_parameters
from nern.predictor import Predictor, predictor_params


@pytest.mark.parametrize("h", [140, 160, 180, 200])
def test_parameter_count_formula(h):
    p = Predictor(240, h, depth=5)
    assert count_parameters(p) == predictor_params(240, h, 5) == 3 * h * h + 253 * h + 9


def test_h180_matches_paper():
    assert count_parameters(Predictor(240, 180)) == 142_749


def test_shape_and_no_output_activation():
    """Linear(6L -> h), ReLU, (depth - 2) x [Linear(h -> h), ReLU], Linear(h -> k*k): the output is the plain
    composition of those layers (no residual, no normalisation, no output activation)."""
    torch.manual_seed(0)
    p = Predictor(24, 16, depth=3)
    assert [type(m) for m in p] == [torch.nn.Linear, torch.nn.ReLU] * 2 + [torch.nn.Linear]
    assert [(m.in_features, m.out_features) for m in p if isinstance(m, torch.nn.Linear)] == [(24, 16), (16, 16),
                                                                                             (16, 9)]
    x = torch.randn(5, 24)
    out = p(x)
    assert out.shape == (5, 9)
    a, b, c = (m for m in p if isinstance(m, torch.nn.Linear))
    assert torch.allclose(out, c(torch.relu(b(torch.relu(a(x))))), atol=1e-6)
    assert (out < 0).any()
    assert len(Predictor(240, 20, depth=5)) == 2 * 4 + 1 and Predictor(240, 20, kernel_size=5)[-1].out_features == 25


def test_variance_init_keeps_scale():
    torch.manual_seed(0)
    x = torch.randn(2048, 240)
    default = Predictor(240, 256, 5)(x).std()
    variance = Predictor(240, 256, 5, init="variance")(x).std()
    assert variance > 3 * default
