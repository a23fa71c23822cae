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
    p = Predictor(24, 16, depth=3)
    out = p(torch.randn(5, 24))
    assert out.shape == (5, 9)
    assert isinstance(p[-1], torch.nn.Linear)
    assert (out < 0).any()


def test_variance_init_keeps_scale():
    torch.manual_seed(0)
    x = torch.randn(2048, 240)
    default = Predictor(240, 256, 5)(x).std()
    variance = Predictor(240, 256, 5, init="variance")(x).std()
    assert variance > 3 * default
