"""Agreement with the original (nern.evaluate): the fidelity metric reported beside delta top-1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nern.evaluate import Predictions, agreement, predictions


def batches(n: int = 96, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n, size)]


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def test_a_network_agrees_with_itself_completely():
    net = small_net()
    mine = predictions(net, batches())
    again = predictions(net, batches())
    assert agreement(mine, again) == {"agreement": 100.0, "kl_to_original": 0.0}


def test_a_perturbed_copy_agrees_less_and_diverges():
    net, copy = small_net(), small_net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        copy[-1].weight.add_(torch.randn(copy[-1].weight.shape, generator=g))
    found = agreement(predictions(net, batches()), predictions(copy, batches()))
    assert 0.0 <= found["agreement"] < 100.0
    assert found["kl_to_original"] > 1e-4


def test_agreement_and_kl_match_their_definitions():
    """Two images: same class on the first, different on the second; KL(p || q) by hand."""
    labels = torch.tensor([0, 1])
    p = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    found = agreement(Predictions(p, labels), Predictions(q, labels))
    assert found["agreement"] == 50.0
    pp, qq = p.double().softmax(1), q.double().softmax(1)
    expected = float((pp * (pp.log() - qq.log())).sum(1).mean())
    assert math.isclose(found["kl_to_original"], expected, rel_tol=1e-9)


def test_top1_of_predictions_counts_correct_argmax():
    found = Predictions(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1, 1, 1]))
    assert found.top1() == 75.0


def test_agreement_refuses_predictions_on_different_images():
    net = small_net()
    with pytest.raises(ValueError, match="same images"):
        agreement(predictions(net, batches(seed=0)), predictions(net, batches(seed=1)))
