import torch

from nern.smoothness import smoothness_penalty


def test_identical_neighbours_are_smoothest():
    smooth = torch.ones(4, 4, 3, 3)
    rough = torch.randn(4, 4, 3, 3)
    assert smoothness_penalty([smooth]) < smoothness_penalty([rough])
    # 4x3 input-axis pairs + 3x4 output-axis pairs, each cosine 1
    assert torch.isclose(smoothness_penalty([smooth]), torch.tensor(-24.0))


def test_cosines_along_both_axes_by_hand():
    """Two filters x two channels of 3x3 kernels: e, -e in filter 0, e, 2e in filter 1 (e = all ones).
    Along the input axis: cos(e, -e) = -1, cos(e, 2e) = 1; along the output axis: cos(e, e) = 1,
    cos(-e, 2e) = -1. The penalty is minus their sum: 0. Flipping one kernel changes each axis differently."""
    e = torch.ones(3, 3)
    w = torch.stack([torch.stack([e, -e]), torch.stack([e, 2 * e])])
    assert torch.isclose(smoothness_penalty([w]), torch.tensor(0.0), atol=1e-6)
    w[1, 1] = -2 * e  # input axis: -1, -1; output axis: 1, 1
    assert torch.isclose(smoothness_penalty([w]), torch.tensor(0.0), atol=1e-6)
    w[0, 1] = e  # input axis: 1, -1; output axis: 1, -1
    assert torch.isclose(smoothness_penalty([w]), torch.tensor(0.0), atol=1e-6)
    w[1, 1] = e  # all four kernels point the same way: every cosine 1
    assert torch.isclose(smoothness_penalty([w]), torch.tensor(-4.0), atol=1e-6)
    w[1, 0] = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0]])  # cos(e, one-hot) = 1/3 twice
    assert torch.isclose(smoothness_penalty([w]), torch.tensor(-(2 + 2 / 3)), atol=1e-6)


def test_1x1_uses_l2_difference_and_gradient_flows():
    """Squared differences of neighbouring scalars, summed along both axes: by hand 9 + 8 = 17."""
    w = torch.tensor([[0.0, 1, 3], [1, 1, 1], [2, 0, 0]]).view(3, 3, 1, 1).requires_grad_()
    # input axis: (1-0)^2 + (3-1)^2 + 0 + 0 + (0-2)^2 + 0 = 9; output axis: 1 + 0 + 4 + 1 + 1 + 1 = 8
    p = smoothness_penalty([w])
    assert torch.isclose(p, torch.tensor(17.0))
    p.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert torch.isclose(smoothness_penalty([torch.full((3, 3, 1, 1), 2.5)]), torch.tensor(0.0))  # constant: 0
    both = smoothness_penalty([w.detach(), torch.ones(4, 4, 3, 3)])
    assert torch.isclose(both, torch.tensor(17.0 - 24.0))  # summed over layers
