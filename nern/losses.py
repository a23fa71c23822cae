"""The three terms of NeRN's objective (METHOD.md 4); nern/objective.py weighs and adds them.

`fmd_loss_reference` is L_FMD written as the paper states it; `fmd_loss` is the same value computed with fused
per-sample reductions and a hand-written backward (the feature maps are an iteration's largest tensors), and
is what training uses. tests/test_losses.py holds the two to the same value and gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KD_EPS = 1e-4
FMD_EPS = 1e-3


def reconstruction_loss(predicted: list[torch.Tensor], original: list[torch.Tensor]) -> torch.Tensor:
    """RMSE over every represented weight of the network, on the cropped kernels placed in the network."""
    squared = sum(((p - o) ** 2).sum() for p, o in zip(predicted, original))
    count = sum(o.numel() for o in original)
    return torch.sqrt(squared / count)


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
