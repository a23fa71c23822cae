"""Weight importance: error maps, the pruning direction, mask sparsity, and the stage on real data."""

from __future__ import annotations

import csv
import math
import json

import pytest
import torch

from nern import importance as I
from nern.cli import main
from nern.errors import NernError
from nern.layers import ConvLayer

from helpers import fashion_mnist_root  # noqa: F401 (fixture)
from test_compress import fitted_resnet8  # noqa: F401 (fixture)


def layer_pair(seed: int = 0, shape=(6, 4, 3, 3)) -> tuple[ConvLayer, torch.Tensor, torch.Tensor]:
    """An original conv weight and a reconstruction whose per-kernel relative error grows with (f, c)."""
    torch.manual_seed(seed)
    w = torch.randn(shape)
    rel = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape[:2]) / 100  # known errors
    direction = torch.randn(shape)
    direction = direction / direction.flatten(2).norm(dim=2)[:, :, None, None]
    w_hat = w + direction * (rel * w.flatten(2).norm(dim=2))[:, :, None, None]
    return ConvLayer("conv", shape), w, w_hat


def test_error_maps_match_their_definitions():
    layer, w, w_hat = layer_pair()
    e = I.layer_error_maps(w, w_hat, layer)
    expected_rel = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 100
    assert torch.allclose(e.kernel_rel, expected_rel, atol=1e-5)
    assert torch.allclose(e.kernel_abs, (w_hat - w).abs().mean(dim=(2, 3)))
    assert torch.allclose(e.filter_rel, (w_hat - w).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1))
    assert torch.allclose(e.weight_rel, (w_hat - w).abs() / w.abs())
    assert e.kernel_abs.shape == (6, 4) and e.filter_abs.shape == (6,)


def test_nern_error_prunes_the_highest_relative_error_first_and_inverse_the_lowest():
    layer, w, w_hat = layer_pair()
    errors = [I.layer_error_maps(w, w_hat, layer)]
    masks = I.pruning_masks("nern-error", "kernel", 0.25, [w], errors)[0]
    kept = masks[:, :, 0, 0].reshape(-1)
    assert not kept[-6:].any() and kept[:-6].all()  # the 6 kernels with the largest error go
    inverse = I.pruning_masks("nern-error-inverse", "kernel", 0.25, [w], errors)[0][:, :, 0, 0].reshape(-1)
    assert not inverse[:6].any() and inverse[6:].all()


@pytest.mark.parametrize("method", I.METHODS)
@pytest.mark.parametrize("granularity", I.GRANULARITIES)
def test_pruning_masks_hit_the_sparsity_in_every_layer(method, granularity):
    pairs = [layer_pair(0, (8, 4, 3, 3)), layer_pair(1, (16, 8, 3, 3)), layer_pair(2, (16, 8, 1, 1))]
    originals = [w for _, w, _ in pairs]
    errors = [I.layer_error_maps(w, w_hat, layer) for layer, w, w_hat in pairs]
    for sparsity in (0.3, 0.5, 0.7):
        masks = I.pruning_masks(method, granularity, sparsity, originals, errors, seed=3)
        for m, w in zip(masks, originals):
            assert m.shape == w.shape
            units = m[:, :, 0, 0] if granularity == "kernel" else m
            assert abs((1 - units.float().mean().item()) - sparsity) <= 1 / units.numel()
            if granularity == "kernel":  # whole kernels: all k*k weights share one decision
                assert torch.equal(m, m[:, :, :1, :1].expand_as(m))


def test_magnitude_pruning_drops_the_smallest_weights_and_overlap_with_itself_is_one():
    layer, w, w_hat = layer_pair()
    errors = [I.layer_error_maps(w, w_hat, layer)]
    mask = I.pruning_masks("magnitude", "unstructured", 0.5, [w], errors)[0]
    assert w.abs()[~mask].max() <= w.abs()[mask].min()
    assert I.overlap([mask], [mask]) == 1.0


def test_spearman_and_bad_options():
    a = torch.arange(10.0)
    assert I.spearman(a, a * 3) == pytest.approx(1.0)
    assert I.spearman(a, -a) == pytest.approx(-1.0)
    with pytest.raises(NernError, match="method 'mag'"):
        I.check_options(I.ImportanceOptions([0.5], ["mag"], ["kernel"]))
    with pytest.raises(NernError, match="sparsity"):
        I.check_options(I.ImportanceOptions([1.0], ["random"], ["kernel"]))


@pytest.mark.slow
def test_importance_stage_on_real_data(fitted_resnet8, tmp_path):
    out = tmp_path / "importance"
    code = main(["importance", "--model", str(fitted_resnet8["model"]), "--predictor", str(fitted_resnet8["predictor"]),
                 "--out", str(out), "--mlflow-uri", "none", "--sparsities", "0,0.5,0.9", "--set", "progress=false"])
    assert code == 0
    for name in ("importance.csv", "importance.md", "metrics.json", "pruning.png", "error_maps.png", "kernels.png"):
        assert (out / name).is_file(), name
    with open(out / "importance.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(I.GRANULARITIES) * len(I.METHODS) * 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(list((out / "error_maps").glob("*.png"))) == len(metrics["layers"])
    for row in rows:
        if float(row["sparsity"]) == 0:
            assert float(row["top1"]) == pytest.approx(metrics["original_top1"])
        else:
            assert abs(float(row["achieved_sparsity"]) - float(row["sparsity"])) < 0.01
    # pruning 90% of every conv without fine-tuning must hurt: the curves measure something real
    worst = min(float(r["top1"]) for r in rows if float(r["sparsity"]) == 0.9)
    assert worst < metrics["original_top1"] - 5
    assert "nern_minus_magnitude/unstructured/0.5" in metrics and metrics["direction"].startswith("prune highest")


def test_spearman_averages_ties_and_is_nan_for_a_constant_side():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # average ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5); position-broken ties would give 1.0
    assert I.spearman(a, b) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert math.isnan(I.spearman(torch.ones(5), b.repeat(2)[:5]))
