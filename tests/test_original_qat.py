"""The equal-budget baseline of `nern compress` (nern.original_qat): the original network trained through the
predictor's learnt-step quantisers. Its file holds exactly the trained integers, and its training budget is the
NeRN fit's, read from the fit's config (that test sits in tests/test_compress.py, beside the fitted ResNet8 it
shares)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nern import codec, qat
from nern import compress as C
from nern import network_files as NF
from nern import original_qat as OQ
from nern.config import FitConfig, ModelConfig, load_config
from nern.errors import NernError
from nern.layers import find_conv_layers
from nern.models import build_model
from nern.pruning import magnitude_masks, prunable_network_weights

from helpers import fashion_mnist_root  # noqa: F401 (fixture)


def noise_config(**extra) -> FitConfig:
    """A data-free budget: the baseline then needs no images (U[-2, 2] noise, as a data-free fit distils on)."""
    return load_config(FitConfig, base={"model": {"arch": "resnet8", "in_channels": 1},
                                        "data": {"name": "fashion_mnist", "batch_size": 8, "download": False},
                                        "data_free": True, "iterations": 3, "progress": False,
                                        "loss": {"kd": 1.0, "fmd": 1.0}, "optim": {"lr": 1e-2}, **extra})


def test_conv_quantisers_round_each_filter_to_its_own_step_and_leave_the_rest():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet8", in_channels=1)).eval()
    layers = find_conv_layers(model)
    names = OQ.attach_student_quantisers(model, layers, 3, quantise_fc=False)
    assert names == [layer.param for layer in layers]  # the represented convs, not the FC
    assert not torch.nn.utils.parametrize.is_parametrized(model.linear, "weight")  # the FC stays plain
    conv = dict(model.named_modules())[layers[1].name]
    step = conv.parametrizations.weight[0].effective_step()
    assert step.shape == (conv.out_channels,)
    q = conv.weight / step.reshape(-1, 1, 1, 1)
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 3
    with pytest.raises(NernError, match="attach them once"):
        OQ.attach_student_quantisers(model, layers, 3, quantise_fc=False)
    assert set(qat.learnt_steps(model)) == set(names)
    fc = OQ.attach_student_quantisers(build_model(ModelConfig(arch="resnet8", in_channels=1)), layers, 4, True)
    assert fc[-1] == "linear.weight"


@pytest.mark.parametrize("bits,sparsity,quantise_fc", [(2, 0.0, False), (3, 0.5, False), (4, 0.5, True)])
def test_the_file_holds_exactly_the_integers_the_trained_quantisers_produce(tmp_path, bits, sparsity, quantise_fc):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet8", in_channels=1)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = find_conv_layers(model)
    masks = magnitude_masks(prunable_network_weights(model), sparsity, "global") if sparsity else {}
    run = OQ.OriginalQAT(noise_config(), model, layers, None, bits, masks, quantise_fc)
    for _ in range(run.total):
        run.step()
    run.close()
    with torch.no_grad():  # steps wider than any weight (no entry at the clip level): the max-|w| step of
        for m in run.student.modules():  # post-training intN would then differ, so only the learnt steps pass
            if isinstance(m, qat.LearntStepQuantiser):
                m.log_step.add_(math.log(1.3))
    produced, integers = {}, {}
    for name in run.quantised:  # what the quantisers produce at the end of training, read off the quantisers
        module = run.student.get_submodule(name.rpartition(".")[0])
        quantiser = module.parametrizations.weight[0]
        original = module.parametrizations.weight.original.detach()
        step = quantiser.effective_step().detach().reshape(-1, *([1] * (original.dim() - 1)))
        integers[name] = torch.round(original / step).clamp(-quantiser.levels, quantiser.levels)
        produced[name] = module.weight.detach().clone()
    trained = OQ.finish(run)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the teacher was not touched
    path = tmp_path / "original.nernz"
    enc = NF.encode_network(trained.network, masks, f"int{bits}", steps=trained.steps,
                            precisions=OQ.unquantised_precisions(trained))
    sizes = codec.write_container(path, enc)
    assert sizes["bytes"] == path.stat().st_size
    tensors, meta = codec.read_container(path)
    moved = 0
    for name in run.quantised:
        decoded = tensors[f"state.{name}"]
        step = trained.steps[name].reshape(-1, *([1] * (decoded.dim() - 1)))
        assert meta["tensors"][f"state.{name}"]["codec"] == f"int{bits}"
        assert torch.equal(decoded, produced[name]), name  # the trained weights, bit for bit
        assert torch.equal((decoded / step).round(), integers[name]), name
        assert torch.equal(OQ.trained_integers(trained.network, trained.steps, bits)[name].float(), integers[name])
        if name in masks:
            assert torch.all(decoded[~masks[name]] == 0)
        moved += int(not torch.equal(decoded, codec.fake_quantise(before[name], f"int{bits}", masks.get(name))))
    assert moved > 0  # training changed what post-training quantisation would have stored
    assert ("linear.weight" in run.quantised) == quantise_fc
    assert meta["tensors"]["state.linear.weight"]["codec"] == (f"int{bits}" if quantise_fc else "int8")
    rebuilt = NF.read_network(path)
    x = torch.randn(2, 1, 28, 28)
    expected = trained.network  # the trained network with its FC as the file holds it (int8 unless quantised)
    if not quantise_fc:
        expected.linear.weight.data = codec.fake_quantise(expected.linear.weight, "int8", masks.get("linear.weight"))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected(x))


def test_the_budget_is_the_configs_and_the_label_term_follows_loss_ce():
    """Non-default values throughout, so a budget that ignored the config (or hard-coded a default) fails."""
    from types import SimpleNamespace

    from nern.data import ImageSet, dataset_info

    cfg = load_config(FitConfig, base={
        "model": {"arch": "resnet8", "in_channels": 1},
        "data": {"name": "fashion_mnist", "batch_size": 6, "download": False, "augment": False},
        "iterations": 4, "seed": 7, "progress": False, "rec_only_iterations": 50,
        "loss": {"kd": 0.7, "fmd": 0.3, "ce": 0.5, "temperature": 2.0},
        "optim": {"name": "adam", "lr": 3e-3, "weight_decay": 0.02, "min_lr": 1e-5, "warmup_iterations": 1,
                  "step_lr_scale": 4.0, "clip_grad_norm": 5.0}})
    info = dataset_info(cfg.data)
    torch.manual_seed(1)
    train = ImageSet(torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (20,)), info)
    model = build_model(ModelConfig(arch="resnet8", in_channels=1)).eval()
    run = OQ.OriginalQAT(cfg, model, find_conv_layers(model), SimpleNamespace(train=train), 4, {}, scale=1.5)
    stats = [run.step() for _ in range(run.total)]
    run.close()
    assert run.total == 6  # 1.5 x the fit's 4 distillation iterations; its 50 reconstruction-only steps see no data
    assert all(s["ce"] > 0 and s["kd"] != 0 and s["fmd"] > 0 for s in stats)  # every term computed (KD's eps
    # makes it slightly negative on this untrained network's near-uniform outputs)
    o = cfg.optim
    assert run.budget() == OQ.Budget(6, 6, 7, False, 0.7, 0.3, 0.5, 2.0, "AdamW", o.lr, o.lr * 4.0, 0.02, 1e-5, 1,
                                     5.0)
    # the fit's distillation cosine, annealed to min_lr (the steps' group at its step_lr_scale multiple)
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([1e-5, 4e-5])


def test_budget_options_are_checked():
    with pytest.raises(NernError, match="--qat-original-bits"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], qat_original_bits=[1]))
    with pytest.raises(NernError, match="--qat-original-scale"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], qat_original_scale=0.0))
    with pytest.raises(NernError, match="--qat-original-sparsities"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], qat_original_sparsities=[1.0]))
    assert OQ.baseline_iterations(noise_config(), 100, 2.5) == 8  # 3 x 2.5, rounded


def test_the_predictor_keeps_its_linear_only_quantisers():
    """The generalisation leaves the predictor path as it was: Linear weights only, one step per row."""
    from nern.predictor import Predictor

    predictor = Predictor(48, 16)
    qat.attach_quantisers(predictor, 4)
    linears = [m for m in predictor if isinstance(m, nn.Linear)]
    assert list(qat.learnt_steps(predictor)) == [f"{i}.weight" for i, m in enumerate(predictor)
                                                 if isinstance(m, nn.Linear)]
    assert all(qat.learnt_steps(predictor)[f"{i}.weight"].shape == (m.out_features,)
               for i, m in enumerate(predictor) if isinstance(m, nn.Linear))
    assert len(qat.learnt_step_parameters(predictor)) == len(linears)
