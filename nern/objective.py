"""NeRN's objective as the paper states it (METHOD.md 4):

    L = l_rec * L_rec + l_kd * L_KD + l_fmd * L_FMD        (no task loss, no labels)
      [+ l_ce * L_CE: cross-entropy on the task's labels, our departure `loss.ce`, 0 unless asked for]

L_rec compares the predicted weights with the original ones; L_KD and L_FMD compare the reconstructed network
(the student) with the original (the teacher) on one batch of images or noise: their logits and their
pre-activation feature maps. The terms themselves are in nern/losses.py; nern/fit.py calls these functions
once per iteration, in this order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nern.losses import fmd_loss, kd_loss, reconstruction_loss


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


def reconstruction_term(predicted: list[torch.Tensor], targets: list[torch.Tensor],
                        layer_weights: list[float] | None = None) -> torch.Tensor:
    """L_rec in float32: the RMSE over all represented weights. With `layer_weights` (loss.rec_space=normalized)
    each layer's predicted weights are scaled by its factor and compared with `targets` already scaled alike."""
    if layer_weights is None:
        return reconstruction_loss([w.float() for w in predicted], targets)
    return reconstruction_loss([w.float() * r for w, r in zip(predicted, layer_weights)], targets)


def kernel_reconstruction_term(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_rec on rows of the kernel matrix: the RMSE over the `mask`ed (real, not zero-padded) entries. On every row
    it equals `reconstruction_term` on the placed weights; on a subset it is that RMSE's minibatch estimate."""
    return torch.sqrt(((predicted.float() - targets) ** 2 * mask).sum() / mask.sum())


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


def nern_objective(weights: LossWeights, rec: torch.Tensor, kd: torch.Tensor, fmd: torch.Tensor,
                   ce: torch.Tensor | None = None) -> torch.Tensor:
    """L = l_rec * L_rec + l_kd * L_KD + l_fmd * L_FMD (+ l_ce * L_CE); only L_rec while the fit does not distil."""
    loss = weights.rec * rec
    if weights.distils:
        loss = loss + weights.kd * kd + weights.fmd * fmd
        if weights.ce > 0 and ce is not None:
            loss = loss + weights.ce * ce
    return loss
