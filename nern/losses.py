"""NeRN's objective and its terms (docs/METHOD.md §4), in one place:

    L = l_rec * L_rec + l_kd * L_KD + l_fmd * L_FMD        (no task loss, no labels)
      [+ l_ce * L_CE: cross-entropy on the task's labels, our departure `loss.ce`, 0 unless asked for]

L_rec compares the predicted weights with the original ones (`reconstruction_loss`; on rows of the kernel matrix,
for the minibatch reconstruction phase, `kernel_rows_reconstruction_loss`). L_KD and L_FMD compare the
reconstructed network (the student) with the original (the teacher) on one batch of images or noise: their
logits and their pre-activation feature maps (`distillation_terms`). nern/method.py calls these once per
iteration, in this order, and adds them with `nern_objective`.

`fmd_loss_reference` is L_FMD written as the paper states it; `fmd_loss` is the same value computed with fused
per-sample reductions and a hand-written backward (the feature maps are an iteration's largest tensors), and
is what training uses. tests/test_losses.py holds the two to the same value and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KD_EPS = 1e-4
FMD_EPS = 1e-3


# -- the objective ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossWeights:
    """(l_rec, l_kd, l_fmd) of one iteration: the distillation weights are zero while a fit only reconstructs
    (its reconstruction-only phase and `loss.warmup`)."""

    rec: float
    kd: float
    fmd: float
    ce: float = 0.0  # loss.ce: not the paper's (NeRN is label-free); 0 keeps it so

    @property
    def distils(self) -> bool:
        """Whether this iteration runs the two networks at all."""
        return self.kd > 0 or self.fmd > 0 or self.ce > 0


@dataclass
class Terms:
    """One iteration's objective and its terms."""

    loss: torch.Tensor
    rec: torch.Tensor
    kd: torch.Tensor
    fmd: torch.Tensor
    ce: torch.Tensor


def nern_objective(weights: LossWeights, rec: torch.Tensor, kd: torch.Tensor, fmd: torch.Tensor,
                   ce: torch.Tensor | None = None) -> torch.Tensor:
    """L = l_rec * L_rec + l_kd * L_KD + l_fmd * L_FMD (+ l_ce * L_CE); only L_rec while the fit does not distil."""
    loss = weights.rec * rec
    if weights.distils:
        loss = loss + weights.kd * kd + weights.fmd * fmd
        if weights.ce > 0 and ce is not None:
            loss = loss + weights.ce * ce
    return loss


# -- L_rec -----------------------------------------------------------------------------------------------


def reconstruction_loss(predicted: list[torch.Tensor], targets: list[torch.Tensor],
                        layer_weights: list[float] | None = None) -> torch.Tensor:
    """L_rec in float32: the RMSE over every represented weight of the network, on the cropped kernels placed in
    the network. With `layer_weights` (loss.rec_space=normalized) each layer's predicted weights are scaled by its
    factor and compared with `targets` already scaled alike."""
    if layer_weights is None:
        predicted = [w.float() for w in predicted]
    else:
        predicted = [w.float() * r for w, r in zip(predicted, layer_weights)]
    squared = sum(((p - o) ** 2).sum() for p, o in zip(predicted, targets))
    count = sum(o.numel() for o in targets)
    return torch.sqrt(squared / count)


def kernel_rows_reconstruction_loss(predicted: torch.Tensor, targets: torch.Tensor,
                                    mask: torch.Tensor) -> torch.Tensor:
    """L_rec on rows of the kernel matrix: the RMSE over the `mask`ed (real, not zero-padded) entries. On every row
    it equals `reconstruction_loss` on the placed weights; on a subset it is that RMSE's minibatch estimate."""
    return torch.sqrt(((predicted.float() - targets) ** 2 * mask).sum() / mask.sum())


# -- L_KD, L_FMD (and L_CE) ------------------------------------------------------------------------------


def distillation_terms(student_logits: torch.Tensor, student_maps: list[torch.Tensor], teacher_logits: torch.Tensor,
                       teacher_maps: list[torch.Tensor], temperature: float, use_kd: bool,
                       use_fmd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_KD, L_FMD) of the student against the teacher on one batch, in float32 whatever precision the networks
    ran in; a term whose weight is zero is not computed (it is 0). The teacher's outputs are constants."""
    zero = student_logits.new_zeros(())
    kd = kd_loss(student_logits.float(), teacher_logits.float(), temperature) if use_kd else zero
    fmd = fmd_loss([m.float() for m in student_maps], [m.float() for m in teacher_maps]) if use_fmd else zero
    return kd, fmd


def label_term(student_logits: torch.Tensor, labels: torch.Tensor, use_ce: bool) -> torch.Tensor:
    """L_CE: the student's cross-entropy on the batch's task labels, in float32 (0 when its weight is zero)."""
    if not use_ce:
        return student_logits.new_zeros((), dtype=torch.float32)
    return torch.nn.functional.cross_entropy(student_logits.float(), labels)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student), batch mean; log(softmax + 1e-4) keeps the student's log finite."""
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=1)
    student_logp = torch.log(F.softmax(student_logits / temperature, dim=1) + KD_EPS)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=1).mean()


def fmd_loss_reference(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """L_FMD as the paper writes it: each sample's whole CxHxW map divided by (its L2 norm + 1e-3), squared
    differences summed over all maps and samples, divided by the batch size. The teacher maps are constants."""
    total = 0
    for s, t in zip(student_maps, teacher_maps, strict=True):
        s, t = s.flatten(1), t.detach().flatten(1)
        s = s / (torch.linalg.vector_norm(s, dim=1, keepdim=True) + FMD_EPS)
        t = t / (torch.linalg.vector_norm(t, dim=1, keepdim=True) + FMD_EPS)
        total = total + ((s - t) ** 2).sum()
    return total / teacher_maps[0].shape[0]


def _distance(ns: torch.Tensor, nt: torch.Tensor, st: torch.Tensor, eps_s: torch.Tensor | float,
              eps_t: torch.Tensor | float) -> torch.Tensor:
    """sum_i ||s_i/(|s_i|+eps) - t_i/(|t_i|+eps)||^2 from the per-sample norms and dot products."""
    ds, dt = ns + eps_s, nt + eps_t
    return ((ns / ds) ** 2 + (nt / dt) ** 2 - 2 * st / (ds * dt)).sum()


class _SquareAndDot(torch.autograd.Function):
    """Per-sample s.s and s.t of a student map s against a constant teacher map t, in two reductions;
    backward writes 2*g_ss*s + g_st*t in two passes where autograd would take five."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(s, t)
        return torch.linalg.vector_norm(s, dim=1) ** 2, torch.linalg.vecdot(s, t, dim=1)

    @staticmethod
    def backward(ctx, g_ss: torch.Tensor, g_st: torch.Tensor) -> tuple[torch.Tensor, None]:
        s, t = ctx.saved_tensors
        grad = s * (2 * g_ss).unsqueeze(1)
        return grad.addcmul_(t, g_st.unsqueeze(1)), None


def _fused_sq_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The fast path: the maps are the largest tensors of an iteration, so read each as few times as possible."""
    t = t.detach()
    ss, st = _SquareAndDot.apply(s, t)
    ns = ss.clamp_min(1e-30).sqrt()
    return _distance(ns, torch.linalg.vector_norm(t, dim=1), st, FMD_EPS, FMD_EPS)


def _scaled_sq_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The overflow-safe path: each map is first divided by its detached max-abs a, with eps replaced by
    eps/a; the value is unchanged, but squares cannot overflow float32 when a badly reconstructed network's
    activations explode."""
    a = s.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    b = t.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    s, t = s / a, t / b
    ns = (s * s).sum(1).clamp_min(1e-30).sqrt()
    nt = (t * t).sum(1).clamp_min(1e-30).sqrt()
    return _distance(ns, nt, (s * t).sum(1), FMD_EPS / a.squeeze(1), FMD_EPS / b.squeeze(1))


def fmd_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """L_FMD (the value of `fmd_loss_reference`), as training computes it.

    The teacher maps are constants (no gradient flows to the original network). The common case uses fused
    reductions (a third of the memory passes of normalising and subtracting); only when some map's norm
    overflows float32 is the whole loss recomputed on max-abs-scaled maps (one check per call, not per map).
    """
    if len(student_maps) != len(teacher_maps):
        raise RuntimeError(f"{len(student_maps)} student maps vs {len(teacher_maps)} teacher maps")
    batch = teacher_maps[0].shape[0]
    pairs = [(s.flatten(1), t.flatten(1)) for s, t in zip(student_maps, teacher_maps)]
    total = sum(_fused_sq_distance(s, t) for s, t in pairs)
    if not torch.isfinite(total):
        total = sum(_scaled_sq_distance(s, t) for s, t in pairs)
    return total / batch
