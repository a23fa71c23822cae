"""NeRN's objective (METHOD.md 4): L = l_rec * L_rec + l_kd * L_KD + l_fmd * L_FMD. No task loss, no labels."""

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


def _normalised_sq_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum_i ||s_i/(|s_i|+eps) - t_i/(|t_i|+eps)||^2, expanded into three per-sample reductions.

    Same value as normalising and subtracting, but with no map-sized temporaries in backward (the maps are
    the largest tensors of an iteration). Each map is first divided by its detached max-abs a, with eps
    replaced by eps/a: the value is unchanged, but squares cannot overflow float32 when a badly
    reconstructed network's activations explode.
    """
    s, t = s.flatten(1), t.flatten(1)
    a = s.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    b = t.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    s, t = s / a, t / b
    ss, tt, st = (s * s).sum(1), (t * t).sum(1), (s * t).sum(1)
    ns = ss.clamp_min(1e-30).sqrt() + FMD_EPS / a.squeeze(1)
    nt = tt.clamp_min(1e-30).sqrt() + FMD_EPS / b.squeeze(1)
    return (ss / ns**2 + tt / nt**2 - 2 * st / (ns * nt)).sum()


def fmd_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """Sum over maps of squared differences of per-sample unit-normalised maps, divided by batch size."""
    if len(student_maps) != len(teacher_maps):
        raise RuntimeError(f"{len(student_maps)} student maps vs {len(teacher_maps)} teacher maps")
    batch = teacher_maps[0].shape[0]
    total = sum(_normalised_sq_distance(s, t) for s, t in zip(student_maps, teacher_maps))
    return total / batch
