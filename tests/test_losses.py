import math

import pytest
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


def _value_and_grad(loss_fn, student: list[torch.Tensor], teacher: list[torch.Tensor]):
    leaves = [s.detach().clone().requires_grad_() for s in student]
    value = loss_fn(leaves, teacher)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def test_fused_fmd_equals_the_papers_fmd_in_value_and_gradient():
    """The fused, custom-backward FMD that training uses is the paper's formula (fmd_loss_reference): several
    maps of different shapes, one a scaled copy of its teacher."""
    from nern.losses import fmd_loss_reference

    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 8, 2, 2, generator=g), torch.randn(4, 16, generator=g)]
    student = [torch.randn(4, 3, 5, 5, generator=g), 3.0 * teacher[1] + 0.01 * torch.randn(4, 8, 2, 2, generator=g),
               torch.randn(4, 16, generator=g)]
    fused, fused_grads = _value_and_grad(fmd_loss, student, teacher)
    paper, paper_grads = _value_and_grad(fmd_loss_reference, student, teacher)
    assert float(paper) > 0.1
    assert torch.allclose(fused, paper, rtol=1e-5)
    for a, b in zip(fused_grads, paper_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_fmd_overflow_fallback_equals_the_papers_fmd_in_value_and_gradient():
    """Exploding activations (1e25: squares overflow float32) take the max-abs-scaled fallback; it must still
    be the paper's formula, which float64 can evaluate directly."""
    from nern.losses import _fused_sq_distance, fmd_loss_reference

    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 3, 3, generator=g)]
    student = [1e25 * torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 3, 3, generator=g)]
    assert not torch.isfinite(_fused_sq_distance(student[0].flatten(1), teacher[0].flatten(1)))  # the fallback runs
    fused, fused_grads = _value_and_grad(fmd_loss, student, teacher)
    paper, paper_grads = _value_and_grad(fmd_loss_reference, [s.double() for s in student],
                                         [t.double() for t in teacher])
    assert torch.isfinite(fused) and torch.allclose(fused.double(), paper, rtol=1e-5)
    for a, b in zip(fused_grads, paper_grads):
        assert torch.isfinite(a).all()
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def test_objective_weighs_the_three_terms_and_skips_distillation_when_its_weights_are_zero():
    from nern.losses import LossWeights, distillation_terms, nern_objective

    rec, kd, fmd = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert float(nern_objective(LossWeights(1.0, 0.5, 0.25), rec, kd, fmd)) == 2.0 + 1.5 + 1.25
    assert float(nern_objective(LossWeights(1.0, 0.0, 0.0), rec, kd, fmd)) == 2.0
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    s_maps, t_maps = [torch.randn(4, 3, 2, 2, generator=g)], [torch.randn(4, 3, 2, 2, generator=g)]
    kd, fmd = distillation_terms(s_logits, s_maps, t_logits, t_maps, 1.0, True, True)
    assert float(kd) == float(kd_loss(s_logits, t_logits)) and float(fmd) == float(fmd_loss(s_maps, t_maps))
    kd, fmd = distillation_terms(s_logits, s_maps, t_logits, t_maps, 1.0, False, True)
    assert float(kd) == 0.0 and float(fmd) > 0


def test_label_term_is_the_cross_entropy_and_counts_only_when_weighted():
    from nern.losses import LossWeights, label_term, nern_objective

    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    ce = label_term(logits, labels, True)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits, labels))
    assert float(label_term(logits, labels, False)) == 0.0
    rec, kd, fmd = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert float(nern_objective(LossWeights(1.0, 0.5, 0.25, 2.0), rec, kd, fmd, ce)) == pytest.approx(
        2.0 + 1.5 + 1.25 + 2.0 * float(ce))
    assert float(nern_objective(LossWeights(1.0, 0.5, 0.25), rec, kd, fmd, ce)) == 2.0 + 1.5 + 1.25
    assert LossWeights(1.0, 0.0, 0.0, 0.1).distils  # a label-only fit still runs the student
