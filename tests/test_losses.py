import math

import torch
import torch.nn.functional as F

from nern.losses import fmd_loss, kd_loss, reconstruction_loss


def test_reconstruction_rmse_over_whole_network():
    a = [torch.zeros(2, 2, 3, 3), torch.zeros(4, 2, 1, 1)]
    b = [torch.ones(2, 2, 3, 3), torch.zeros(4, 2, 1, 1)]
    expected = math.sqrt(36 / (36 + 8))
    assert math.isclose(float(reconstruction_loss(a, b)), expected, rel_tol=1e-6)


def test_kd_zero_for_equal_logits_up_to_eps_and_positive_otherwise():
    z = torch.randn(8, 10)
    same = float(kd_loss(z, z))
    assert abs(same) < 1e-3
    assert float(kd_loss(torch.randn(8, 10), z)) > same


def test_kd_matches_stable_formula():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    p = F.softmax(t, 1)
    expected = (p * (torch.log(p) - torch.log(F.softmax(s, 1) + 1e-4))).sum(1).mean()
    assert torch.allclose(kd_loss(s, t), expected, atol=1e-6)


def test_fmd_normalises_each_sample_and_divides_by_batch():
    t = [torch.randn(4, 3, 5, 5)]
    assert float(fmd_loss([2.0 * t[0]], t)) < 1e-4  # scale invariant per sample
    s = [torch.randn(4, 3, 5, 5)]
    manual = 0.0
    for i in range(4):
        a = s[0][i].flatten() / (s[0][i].norm() + 1e-3)
        b = t[0][i].flatten() / (t[0][i].norm() + 1e-3)
        manual += float(((a - b) ** 2).sum())
    assert math.isclose(float(fmd_loss(s, t)), manual / 4, rel_tol=1e-5)


def test_fmd_survives_exploding_activations():
    t = [torch.randn(2, 3, 4, 4)]
    s = [(1e25 * torch.randn(2, 3, 4, 4)).requires_grad_()]
    loss = fmd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s[0].grad).all()
    zero = [torch.zeros(2, 3, 4, 4, requires_grad=True)]
    fmd_loss(zero, t).backward()
    assert torch.isfinite(zero[0].grad).all()


def test_fmd_fast_path_and_overflow_safe_path_agree_in_value_and_gradient():
    from nern.losses import _fused_sq_distance, _scaled_sq_distance

    torch.manual_seed(0)
    t = torch.randn(4, 50)
    grads = []
    for path in (_fused_sq_distance, _scaled_sq_distance):
        s = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)).requires_grad_()
        value = path(s, t)
        value.backward()
        grads.append((value.detach(), s.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)
