import torch

from nern.smoothness import smoothness_penalty


def test_identical_neighbours_are_smoothest():
    smooth = torch.ones(4, 4, 3, 3)
    rough = torch.randn(4, 4, 3, 3)
    assert smoothness_penalty([smooth]) < smoothness_penalty([rough])
    # 4x3 input-axis pairs + 3x4 output-axis pairs, each cosine 1
    assert torch.isclose(smoothness_penalty([smooth]), torch.tensor(-24.0))


def test_1x1_uses_l2_difference_and_gradient_flows():
    w = torch.randn(3, 3, 1, 1, requires_grad=True)
    p = smoothness_penalty([w])
    p.backward()
    assert p >= 0 and w.grad is not None and w.grad.abs().sum() > 0
