"""The quantisation-aware predictor (nern.qat), its file (the codec stores exactly the trained integers) and the
NNCodec baseline (nern.nnc, skipped where NNCodec is not installed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nern import codec, nnc, qat
from nern import compress as C
from nern import network_files as NF
from nern.config import ModelConfig
from nern.errors import NernError
from nern.models import build_model
from nern.predictor import Predictor

from helpers import fashion_mnist_root  # noqa: F401 (fixture)
from test_compress import EMBEDDING, tiny_setup

needs_nncodec = pytest.mark.skipif(not nnc.available(), reason="nncodec is not installed (bash setup.sh installs it)")


def quantised(bits: int = 3, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    predictor = Predictor(6 * EMBEDDING.levels, 16)
    qat.attach_quantisers(predictor, bits)
    return predictor


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantised_weights_are_integers_times_the_learnt_step(bits):
    predictor = quantised(bits)
    steps = qat.learnt_steps(predictor)
    assert set(steps) == {f"{i}.weight" for i, m in enumerate(predictor) if isinstance(m, nn.Linear)}
    levels = 2 ** (bits - 1) - 1
    for name, step in steps.items():
        w = predictor.get_submodule(name.rsplit(".", 1)[0]).weight
        q = w / step[:, None]
        assert torch.allclose(q, q.round(), atol=1e-4)
        assert q.abs().max() <= levels + 1e-4
        assert len(torch.unique(q.round())) <= 2 * levels + 1


def test_initial_steps_beat_the_max_abs_step_on_a_heavy_tailed_row():
    w = torch.randn(4, 500)
    w[:, 0] = 20.0  # one outlier per row: max |w| / L would waste most levels on it
    levels = 7
    learnt = qat.initial_steps(w, levels)
    naive = w.abs().amax(dim=1) / levels

    def error(step):
        return ((torch.round(w / step[:, None]).clamp(-levels, levels) * step[:, None] - w) ** 2).sum()

    assert error(learnt) < error(naive)


def test_gradients_pass_the_rounding_and_reach_the_steps():
    predictor = quantised(3)
    out = predictor(torch.randn(5, 6 * EMBEDDING.levels)).pow(2).sum()
    out.backward()
    first = predictor[0].parametrizations.weight
    assert first.original.grad is not None and first.original.grad.abs().sum() > 0
    assert first[0].log_step.grad is not None and first[0].log_step.grad.abs().sum() > 0


def test_the_steps_are_float16_values_and_their_gradient_passes_the_rounding():
    predictor = quantised(4)
    with torch.no_grad():
        predictor[0].parametrizations.weight[0].log_step.add_(1e-3)  # off the float16 grid
    for step in qat.learnt_steps(predictor).values():
        assert torch.equal(step.half().float(), step)
    predictor(torch.randn(5, 6 * EMBEDDING.levels)).pow(2).sum().backward()
    assert predictor[0].parametrizations.weight[0].log_step.grad.abs().sum() > 0


def test_steps_stay_positive_under_updates_larger_than_the_step():
    """An Adam-type update of ~lr per step on a step of ~0.015 (6 bits) drove raw steps below zero: rows died."""
    torch.manual_seed(0)
    predictor = quantised(6)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=0.05)
    x = torch.randn(64, 6 * EMBEDDING.levels)
    for _ in range(30):  # a loss that pushes every weight, hence every step, towards zero
        optimizer.zero_grad()
        predictor(x).pow(2).mean().backward()
        optimizer.step()
    for step in qat.learnt_steps(predictor).values():
        assert step.min() > 1e-4 and torch.isfinite(step).all()  # raw steps hit the 1e-8 floor here


def test_steps_are_stored_as_float16_only_where_that_is_lossless():
    exact = torch.tensor([0.5, 0.125, 3.0])
    assert codec.compact_scale(exact).dtype == torch.float16
    assert codec.compact_scale(exact + 1e-6).dtype == torch.float32
    for scale in (exact, exact + 1e-6):
        w = torch.randn(3, 7)
        stored, spec = codec.encode_tensor("w", w, "int4", scale=scale)
        expected = torch.round(w / scale[:, None]).clamp(-7, 7) * scale[:, None]
        assert torch.allclose(codec.decode_tensor("w", spec, stored), expected, atol=1e-6)


def test_bad_bit_width_is_a_clear_error():
    with pytest.raises(NernError, match="outside"):
        qat.attach_quantisers(Predictor(8, 4), 1)
    with pytest.raises(NernError, match="--qat-bits"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], qat_bits=[9]))


@pytest.mark.parametrize("bits", [3, 4])
def test_the_file_stores_exactly_the_trained_integers(tmp_path, bits):
    model, rep, _ = tiny_setup()
    predictor = quantised(bits)
    with torch.no_grad():  # a step of training: weights off the grid, steps moved
        for module in predictor:
            if isinstance(module, nn.Linear):
                module.parametrizations.weight.original.add_(0.01 * torch.randn_like(module.weight))
                module.parametrizations.weight[0].log_step.add_(math.log(1.1))
    steps = qat.learnt_steps(predictor)
    qat.detach_quantisers(predictor)
    trained = {k: v.clone() for k, v in predictor.state_dict().items()}
    path = tmp_path / "q.nernz"
    enc = NF.encode_nern(predictor, {}, f"int{bits}", rep, EMBEDDING, model, steps=steps, verbatim_precision="int8",
                        vectors="fp16")
    codec.write_container(path, enc)
    tensors, meta = codec.read_container(path)
    decoded = NF.decode_predictor(tensors, meta).state_dict()
    for name, value in trained.items():
        if value.dim() == 2:  # the weights: bit exact up to float rounding of q * step
            assert torch.allclose(decoded[name], value, rtol=0, atol=1e-6), name
        else:  # biases as fp16
            assert torch.allclose(decoded[name], value, rtol=1e-3, atol=1e-4), name
    assert meta["tensors"]["verbatim.linear.weight"]["codec"] == "int8"
    assert meta["tensors"]["verbatim.bn1.weight"]["codec"] == "fp16"


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_widths_that_do_not_tile_a_byte_are_stored_one_value_per_byte(bits):
    values = torch.randint(0, 2 ** bits, (1000,), dtype=torch.uint8)
    packed = codec.pack_bits(values, bits)
    assert packed.numel() == 1000
    assert torch.equal(codec.unpack_bits(packed, bits, 1000), values)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_widths_that_tile_a_byte_are_bit_packed(bits):
    values = torch.randint(0, 2 ** bits, (1000,), dtype=torch.uint8)
    packed = codec.pack_bits(values, bits)
    assert packed.numel() == 1000 * bits // 8
    assert torch.equal(codec.unpack_bits(packed, bits, 1000), values)


def test_nncodec_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(C, "nnc_available", lambda: False)
    with pytest.raises(NernError, match="setup.sh"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], nncodec_qps=[-26]))
    with pytest.raises(NernError, match="outside"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], nncodec_qps=[12]))


@needs_nncodec
def test_nncodec_bitstream_round_trip_rebuilds_the_network(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet8", in_channels=1)).eval()
    path = tmp_path / "m.nnc"
    fine = nnc.write_nnc(path, nnc.float_tensors(model.state_dict()), -38)
    assert fine == path.stat().st_size > 0
    rebuilt = NF.read_nnc_network(path, NF.fresh_skeleton(model))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=0.05 * model(x).abs().max().item())
    coarse = nnc.write_nnc(tmp_path / "c.nnc", nnc.float_tensors(model.state_dict()), -12)
    assert coarse < fine


@needs_nncodec
def test_nern_predictor_through_nncodec_reads_back(tmp_path):
    model, rep, predictor = tiny_setup()
    tensors = {**{f"predictor.{k}": v for k, v in predictor.state_dict().items()},
               **{f"verbatim.{k}": v for k, v in NF.verbatim_state(model, rep).items()}}
    nnc_path = tmp_path / "p.nnc"
    nnc.write_nnc(nnc_path, nnc.float_tensors(tensors), -38)
    container = tmp_path / "p.nernz"
    codec.write_container(container, NF.encode_nern(predictor, {}, "fp32", rep, EMBEDDING, model, parts=()))
    rebuilt = NF.read_network(container, nnc_path=nnc_path)
    exact = NF.read_network(_fp32_file(tmp_path, predictor, rep, model))
    for (name, a), b in zip(rebuilt.state_dict().items(), exact.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=0.05 * max(b.abs().max().item(), 1e-3)), name


def _fp32_file(tmp_path, predictor, rep, model):
    path = tmp_path / "fp32.nernz"
    codec.write_container(path, NF.encode_nern(predictor, {}, "fp32", rep, EMBEDDING, model))
    return path


# -- a fit through the quantiser (predictor.quantise_bits) ----------------------------------------------------


def quantised_fit_config(root, bits: int = 3, **extra):
    from test_fit import tiny_fit

    return tiny_fit(root, predictor={"hidden": 24, "normalize_targets": True, "quantise_bits": bits},
                    sampling={"method": "all"}, rec_only_iterations=6, iterations=6, **extra)


def test_quantise_bits_outside_the_codec_widths_is_a_clear_error():
    from nern.config import FitConfig, load_config

    for bits in (1, 9):
        with pytest.raises(NernError, match=r"predictor\.quantise_bits.*\[2, 8\]"):
            load_config(FitConfig, overrides=[f"predictor.quantise_bits={bits}"])


def test_a_quantised_fit_trains_through_the_rounding_and_its_file_holds_what_it_evaluated(
        fashion_mnist_root, tmp_path):
    from nern.fit import Fitter
    from nern.fit_setup import prepare
    from nern.predictor_file import decode_weights, fitted_steps, load_predictor, save_predictor

    cfg = quantised_fit_config(fashion_mnist_root, bits=3)
    with Fitter(cfg, prepare(cfg), tmp_path) as fitter:
        before = {k: v.clone() for k, v in fitter.predictor.state_dict().items()}
        for _ in range(8):  # reconstruction-only steps, then distillation
            fitter.step()
        after = fitter.predictor.state_dict()
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert any(k.endswith(".log_step") for k in moved) and any(k.endswith(".original") for k in moved)
        evaluated = fitter.reconstructed_weights()
        save_predictor(tmp_path / "p.safetensors", fitter.predictor, fitter.s.rep, cfg, {})
        model = fitter.s.model
    steps = fitted_steps(tmp_path / "p.safetensors")
    predictor, rep, loaded_cfg = load_predictor(tmp_path / "p.safetensors", model)
    assert loaded_cfg.predictor.quantise_bits == 3 and set(steps) == set(qat.learnt_steps(fitter.predictor))
    for name, step in steps.items():  # the stored weights are 3-bit integers times the learnt steps
        q = predictor.state_dict()[name] / step[:, None]
        assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 3 + 1e-4
    for a, b in zip(decode_weights(predictor, rep, loaded_cfg), evaluated):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_steps_learn_in_their_own_group_at_the_scaled_lr_without_weight_decay(fashion_mnist_root, tmp_path):
    from dataclasses import replace

    from nern.fit import Fitter
    from nern.fit_setup import prepare

    base = quantised_fit_config(fashion_mnist_root, bits=4)
    cfg = replace(base, optim=replace(base.optim, step_lr_scale=10.0, weight_decay=1e-3))
    with Fitter(cfg, prepare(cfg), tmp_path) as fitter:
        weights, steps = fitter.optimizer.param_groups
        assert {id(p) for p in steps["params"]} == {id(p) for p in qat.learnt_step_parameters(fitter.predictor)}
        assert len(steps["params"]) == len(qat.quantisable_linears(fitter.predictor))
        assert steps["weight_decay"] == 0.0 and weights["weight_decay"] == 1e-3
        for _ in range(6):  # the schedule scales both groups alike, across the reconstruction/distillation switch
            assert steps["lr"] == pytest.approx(10.0 * weights["lr"])
            fitter.step()
    float_cfg = replace(cfg, predictor=replace(cfg.predictor, quantise_bits=None))
    with Fitter(float_cfg, prepare(float_cfg), tmp_path / "float") as fitter:
        assert len(fitter.optimizer.param_groups) == 1


def test_a_non_positive_step_lr_scale_is_a_clear_error():
    from nern.config import FitConfig, load_config

    with pytest.raises(NernError, match=r"optim\.step_lr_scale"):
        load_config(FitConfig, overrides=["optim.step_lr_scale=0"])


def fit_resumes_exactly(cfg, tmp_path, steps_before_kill: int) -> dict:
    """A fit killed after `steps_before_kill` steps and rerun ends bit-identical to one run straight through;
    returns the straight run's predictor file tensors."""
    from nern.artifacts import load_tensors
    from nern.fit import Fitter, fit
    from nern.fit_setup import prepare

    straight = fit(cfg, tmp_path / "straight")
    partial = Fitter(cfg, prepare(cfg), tmp_path / "resumed")
    partial.original_acc = partial.evaluate_original()
    for _ in range(steps_before_kill):
        partial.step()
    partial.training_loop().save()
    partial.close()
    resumed = Fitter(cfg, prepare(cfg), tmp_path / "resumed").run()
    assert resumed["resumed"] is True and resumed["final_loss"] == straight["final_loss"]
    a, _ = load_tensors(tmp_path / "straight" / "predictor.safetensors")
    b, _ = load_tensors(tmp_path / "resumed" / "predictor.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a


@pytest.mark.slow
def test_a_quantised_fit_resumes_exactly(fashion_mnist_root, tmp_path):
    fit_resumes_exactly(quantised_fit_config(fashion_mnist_root, bits=4), tmp_path, steps_before_kill=8)


def test_compress_stores_a_quantised_fit_at_its_own_width_exactly(fashion_mnist_root, tmp_path):
    from nern.data import build_splits
    from nern.fit import fit
    from nern.predictor_file import decode_weights, fitted_steps, load_predictor
    from nern.layers import conv_weights

    cfg = quantised_fit_config(fashion_mnist_root, bits=3)
    model = build_model(cfg.model).eval()
    fit(cfg, tmp_path / "fit", model=model)
    path = tmp_path / "fit" / "predictor.safetensors"
    predictor, rep, fitted = load_predictor(path, model)
    opts = C.CompressOptions([0], ["global"], ["none"], ["fp16"])
    rows, _ = C.run_compress(model, predictor, rep, fitted, build_splits(cfg.data), tmp_path / "c", opts,
                             fitted_steps(path))
    row = next(r for r in rows if r["representation"] == "nern" and r["precision"] == "int3")
    network = NF.read_network(tmp_path / "c" / "files" / row["file"])
    for a, b in zip(conv_weights(network, rep.layers), decode_weights(predictor, rep, fitted)):
        assert torch.allclose(a, b, atol=1e-5)
    fp16 = next(r for r in rows if r["representation"] == "nern" and r["precision"] == "fp16")
    assert row["bytes"] < fp16["bytes"]
    with pytest.raises(NernError, match="no learnt steps"):
        C.run_compress(model, predictor, rep, fitted, None, tmp_path / "d", opts, {})
