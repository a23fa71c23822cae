"""Meta-compression: the file format round trip (nern.codec), pruning masks (nern.pruning), quantisation error,
and the stage on real data (nern.compress)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from nern import codec, original_qat, pruning
from nern.artifacts import read_metadata
from nern import compress as C
from nern import network_files as NF
from nern.cli import main
from nern.config import EmbeddingConfig, FitConfig, ModelConfig, PretrainConfig, load_config
from nern.errors import NernError
from nern.fit import fit
from nern.layers import find_conv_layers
from nern.models import build_model, load_model
from nern.predictor import Predictor
from nern.predictor_file import decode_weights, load_predictor
from nern.pretrain import pretrain
from nern.reconstruct import Representation, identity_positions, reconstructed_model

from helpers import fashion_mnist_root  # noqa: F401 (fixture)

EMBEDDING = EmbeddingConfig(levels=8, base=0.76)


def tiny_setup(seed: int = 0) -> tuple[torch.nn.Module, Representation, Predictor]:
    """ResNet8 (1 input channel), a permuted layer, per-layer scales and a small predictor: no data needed."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="resnet8", in_channels=1)).eval()
    layers = find_conv_layers(model)
    positions = identity_positions(layers)
    positions[2] = torch.randperm(layers[2].num_kernels)
    rep = Representation(layers, positions, 3, torch.rand(len(layers)) + 0.5)
    return model, rep, Predictor(6 * EMBEDDING.levels, 16).eval()


def write_nern(tmp_path, predictor, masks, precision, rep, model, name="p.nernz", compressor="zstd"):
    path = tmp_path / name
    sizes = codec.write_container(path, NF.encode_nern(predictor, masks, precision, rep, EMBEDDING, model), compressor)
    return path, sizes


# -- format round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["zstd", "lzma"])
def test_fp32_nern_file_round_trip_is_bit_exact(tmp_path, compressor):
    model, rep, predictor = tiny_setup()
    path, sizes = write_nern(tmp_path, predictor, {}, "fp32", rep, model, compressor=compressor)
    assert sizes["bytes"] == path.stat().st_size
    tensors, meta = codec.read_container(path)
    decoded = NF.decode_predictor(tensors, meta)
    for key, value in predictor.state_dict().items():
        assert torch.equal(decoded.state_dict()[key], value), key
    decoded_rep = NF.decode_representation(tensors, meta)
    assert all(torch.equal(a, b) for a, b in zip(decoded_rep.positions, rep.positions))
    assert torch.equal(decoded_rep.scales, rep.scales)
    assert meta["identity_permutations"] == [i for i in range(len(rep.layers)) if i != 2]
    # the rebuilt network (fresh skeleton + file) is exactly the in-memory reconstruction of the original
    rebuilt = NF.read_network(path)
    cfg = load_config(FitConfig, base={"embedding": {"levels": EMBEDDING.levels, "base": EMBEDDING.base}})
    expected = reconstructed_model(model, rep, decode_weights(predictor, rep, cfg))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(rebuilt(x), expected(x))


@pytest.mark.parametrize("precision,sparsity,scope", [("fp16", 0.0, "global"), ("int8", 0.7, "global"),
                                                      ("int6", 0.5, "layer"), ("int4", 0.9, "layer")])
def test_pruned_quantised_predictor_reads_back_bit_exact(tmp_path, precision, sparsity, scope):
    model, rep, predictor = tiny_setup()
    pruned, masks = pruning.pruned_predictor(predictor, sparsity, scope)
    path, _ = write_nern(tmp_path, pruned, masks, precision, rep, model)
    decoded = NF.decode_predictor(*codec.read_container(path)).state_dict()
    for key, value in pruned.state_dict().items():
        expected = codec.fake_quantise(value, NF.tensor_precision(value, precision, "fp32"), masks.get(key))
        assert torch.equal(decoded[key], expected), key
        if key in masks:
            assert torch.all(decoded[key][~masks[key]] == 0)
    # deterministic: the same predictor gives the same bytes
    again, _ = write_nern(tmp_path, pruned, masks, precision, rep, model, name="again.nernz")
    assert again.read_bytes() == path.read_bytes()


def test_original_network_files_round_trip_and_shrink_with_precision(tmp_path):
    model, _, _ = tiny_setup()
    sizes = {}
    for precision in ("fp32", "fp16", "int8", "int4"):
        path = tmp_path / f"{precision}.nernz"
        sizes[precision] = codec.write_container(path, NF.encode_network(model, {}, precision))["bytes"]
        state = NF.read_network(path).state_dict()
        if precision == "fp32":
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]


def _with_batchnorm_statistics(model):
    """Running statistics far from 0 and 1, so that folding them is not trivially exact."""
    with torch.no_grad():
        for bn in NF.batchnorm_modules(model).values():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def test_folded_batchnorm_computes_the_same_function_in_fewer_bytes(tmp_path):
    model, rep, predictor = tiny_setup()
    model = _with_batchnorm_statistics(model)
    x = torch.randn(6, 1, 28, 28)
    for kind, encode in (("network", lambda fold: NF.encode_network(model, {}, "fp32", fold=fold)),
                         ("nern", lambda fold: NF.encode_nern(predictor, {}, "fp32", rep, EMBEDDING, model, fold=fold))):
        outputs, sizes = {}, {}
        for fold in (False, True):
            path = tmp_path / f"{kind}-{fold}.nernz"
            sizes[fold] = codec.write_container(path, encode(fold))["bytes"]
            with torch.no_grad():
                outputs[fold] = NF.read_network(path)(x)
        assert torch.allclose(outputs[True], outputs[False], rtol=1e-4, atol=1e-4), kind
        assert sizes[True] < sizes[False], kind
    _, meta = codec.read_container(tmp_path / "network-True.nernz")
    assert meta["folded_batchnorm"] == list(NF.batchnorm_modules(model))
    assert not any("running_" in name for name in meta["tensors"])
    with pytest.raises(NernError, match="--batchnorm 'merge'"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], batchnorm="merge"))


def test_verbatim_floor_keeps_the_matrices_fine_under_a_coarse_predictor(tmp_path):
    model, rep, predictor = tiny_setup()
    matrices = {n: t for n, t in NF.verbatim_state(model, rep).items() if t.dim() >= 2}
    assert matrices, "the tiny network must have a verbatim matrix (its FC) for this test"
    assert C.finer("int2", "int8") == "int8" and C.finer("fp16", "int8") == "fp16" and C.finer("int4", None) == "int4"
    errors = {}
    for floor in (None, "int8"):
        enc = NF.encode_nern(predictor, {}, "int2", rep, EMBEDDING, model, verbatim_precision=C.finer("int2", floor))
        path = tmp_path / f"{floor}.nernz"
        codec.write_container(path, enc)
        state = NF.read_network(path).state_dict()
        errors[floor] = max(((state[n] - t).norm() / t.norm()).item() for n, t in matrices.items())
    assert errors["int8"] < 0.02 < errors[None]
    with pytest.raises(NernError, match="--verbatim-min 'int9'"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], verbatim_min="int9"))


def test_int8_vectors_keep_biases_and_batchnorm_within_half_a_step_in_fewer_bytes(tmp_path):
    """--vectors int8: every 1-D tensor of an integer file is one int8 scale-and-levels tensor, read back within
    half its step of the original; the file shrinks; matrices are untouched by the option."""
    model, rep, predictor = tiny_setup()
    model = _with_batchnorm_statistics(model)
    sizes, states = {}, {}
    for vectors in ("fp16", "int8"):
        enc = NF.encode_nern(predictor, {}, "int4", rep, EMBEDDING, model, vectors=vectors, fold=True)
        path = tmp_path / f"{vectors}.nernz"
        sizes[vectors] = codec.write_container(path, enc)["bytes"]
        tensors, _ = codec.read_container(path)
        states[vectors] = tensors
        assert all(enc.specs[n]["codec"] == (vectors if t.dim() == 1 else "int4")
                   for n, t in tensors.items() if t.is_floating_point() and not n.startswith("scales")), vectors
    reference = {**{f"predictor.{k}": v for k, v in predictor.state_dict().items()},
                 **{f"verbatim.{k}": v for k, v in NF.fold_batchnorm(NF.verbatim_state(model, rep), model)[0].items()}}
    vectors_checked = 0
    for name, t in reference.items():
        if t.dim() != 1 or not t.is_floating_point():
            continue
        half_step = t.abs().max() / 127 / 2
        assert (states["int8"][name] - t).abs().max() <= half_step * (1 + 1e-3) + 1e-7, name
        vectors_checked += 1
    assert vectors_checked > 10  # predictor biases and every folded BatchNorm
    assert all(torch.equal(states["int8"][n], states["fp16"][n]) for n, t in reference.items() if t.dim() >= 2)
    assert sizes["int8"] < sizes["fp16"]
    with pytest.raises(NernError, match="--vectors 'int4'"):
        C.check_options(C.CompressOptions([0], ["global"], ["none"], ["fp32"], vectors="int4"))


def test_damaged_or_foreign_files_are_user_errors(tmp_path):
    model, rep, predictor = tiny_setup()
    path, _ = write_nern(tmp_path, predictor, {}, "int8", rep, model)
    truncated = tmp_path / "cut.nernz"
    truncated.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(NernError, match="damaged or truncated"):
        codec.read_container(truncated)
    foreign = tmp_path / "foreign.nernz"
    foreign.write_bytes(b"not a container")
    with pytest.raises(NernError, match="not a NeRN compressed file"):
        codec.read_container(foreign)


# -- pruning masks and quantisation ---------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_magnitude_masks_hit_the_requested_sparsity(scope, sparsity):
    _, _, predictor = tiny_setup()
    weights = pruning.prunable_predictor_weights(predictor)
    masks = pruning.magnitude_masks(weights, sparsity, scope)
    total = sum(w.numel() for w in weights.values())
    assert abs(pruning.mask_sparsity(masks) - sparsity) <= 1 / total
    groups = [(weights[k], masks[k]) for k in weights] if scope == "layer" else [
        (torch.cat([w.reshape(-1) for w in weights.values()]), torch.cat([m.reshape(-1) for m in masks.values()]))]
    for w, m in groups:
        if scope == "layer":
            assert abs((1 - m.float().mean().item()) - sparsity) <= 1 / w.numel()
        assert w.detach().abs()[~m].max() <= w.detach().abs()[m].min()  # the smallest go first


def test_pruned_predictor_is_exactly_zero_where_masked():
    _, _, predictor = tiny_setup()
    pruned, masks = pruning.pruned_predictor(predictor, 0.6, "global")
    params = dict(pruned.named_parameters())
    assert all(torch.all(params[k][~m] == 0) and torch.all(params[k][m] != 0) for k, m in masks.items())
    assert dict(predictor.named_parameters())["0.weight"].abs().min() > 0  # the input predictor is untouched


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_bit_packing_round_trip(bits):
    values = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = codec.pack_bits(values, bits)
    # 2 and 4 bits tile a byte and are packed; 3 and 6 stay one per byte (the entropy coder sees the symbols)
    assert packed.numel() == (-(-1001 * bits // 8) if bits in codec.PACKED_BITS else 1001)
    assert torch.equal(codec.unpack_bits(packed, bits, 1001), values)


@pytest.mark.parametrize("precision", ["int8", "int6", "int4"])
def test_quantised_weights_stay_within_half_a_step(precision):
    torch.manual_seed(1)
    w = torch.randn(12, 7, 3, 3) * torch.logspace(-3, 0, 12)[:, None, None, None]
    mask = torch.rand(w.shape) > 0.4
    for m in (None, mask):
        bits = codec.bits_of(precision)
        scale = codec.channel_scales(w, bits, m)
        restored = codec.fake_quantise(w, precision, m)
        bound = (scale / 2)[:, None, None, None] * (1 + 1e-6)
        keep = torch.ones_like(w, dtype=torch.bool) if m is None else m
        assert torch.all(((restored - w).abs() <= bound)[keep])
        assert torch.all(restored[~keep] == 0)
        levels = 2 ** (bits - 1) - 1  # the integer grid really has 2**bits - 1 levels
        assert torch.all((restored[keep] / scale[:, None, None, None].expand_as(w)[keep]).round().abs() <= levels)


def test_option_errors_are_user_errors():
    with pytest.raises(NernError, match="sparsity"):
        C.check_options(C.CompressOptions([1.2], ["global"], ["none"], ["fp32"]))
    with pytest.raises(NernError, match="precision 'int9'"):
        C.check_options(C.CompressOptions([0.5], ["global"], ["none"], ["int9"]))


# -- the stage on real Fashion-MNIST -------------------------------------------------------------------------


def tiny_data(root) -> dict:
    return {"name": "fashion_mnist", "root": str(root), "batch_size": 64, "val_size": 500, "eval_limit": 300,
            "eval_batch_size": 300, "download": False}


@pytest.fixture(scope="module")
def fitted_resnet8(fashion_mnist_root, tmp_path_factory):
    """A ResNet8 trained briefly on real Fashion-MNIST and a small NeRN fitted to it (with a permutation)."""
    from nern.permutation import compute_permutations

    root = tmp_path_factory.mktemp("resnet8")
    torch.manual_seed(0)
    pre = load_config(PretrainConfig, base={"model": {"arch": "resnet8", "in_channels": 1},
                                            "data": {**tiny_data(fashion_mnist_root), "batch_size": 128},
                                            "epochs": 0.1, "lr": 0.05, "milestones": [], "progress": False})
    metrics = pretrain(pre, root / "original")
    assert metrics["test_top1"] > 40  # really trained, far above chance
    model_path = root / "original" / "model.safetensors"
    cfg = load_config(FitConfig, base={
        "model": {"arch": "resnet8", "in_channels": 1, "checkpoint": str(model_path)},
        "data": tiny_data(fashion_mnist_root), "predictor": {"hidden": 24, "normalize_targets": True},
        "embedding": {"levels": 8}, "sampling": {"batch": 512}, "iterations": 10, "eval_every": 0,
        "checkpoint_every": 0, "progress": False})
    model = load_model(cfg.model)
    layers = find_conv_layers(model)
    perms = compute_permutations([dict(model.named_parameters())[la.param].detach() for la in layers],
                                 "infilter", progress=False)
    fit(cfg, root / "fit", model=model, permutation=perms)
    return {"model": model_path, "predictor": root / "fit" / "predictor.safetensors", "cfg": cfg,
            "data": tiny_data(fashion_mnist_root)}


def test_finetune_keeps_the_mask_and_changes_the_rest(fitted_resnet8, tmp_path):
    from nern.data import build_splits

    cfg = fitted_resnet8["cfg"]
    model = load_model(cfg.model)
    predictor, rep, saved = load_predictor(fitted_resnet8["predictor"], model)
    pruned, masks = pruning.pruned_predictor(predictor, 0.7, "global")
    splits = build_splits(saved.data)
    for data_free in (False, True):
        tuned = C.finetune_pruned(pruned, masks, saved, model, rep, splits, 3, 1e-3, data_free, tmp_path)
        params, before = dict(tuned.named_parameters()), dict(pruned.named_parameters())
        for name, mask in masks.items():
            assert torch.all(params[name][~mask] == 0)
        assert any(not torch.equal(params[n][m], before[n][m]) for n, m in masks.items())


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_compress_stage_measures_every_row_on_the_file_read_back(fitted_resnet8, tmp_path):
    from nern.data import build_splits
    from nern.evaluate import top_k_accuracy
    from nern import data as data_mod

    out = tmp_path / "compress"
    code = main(["compress", "--model", str(fitted_resnet8["model"]), "--predictor", str(fitted_resnet8["predictor"]),
                 "--out", str(out), "--mlflow-uri", "none", "--sparsities", "0,0.6", "--scopes", "global",
                 "--finetune", "none,data", "--finetune-iterations", "2", "--precisions", "fp32,int8",
                 "--set", "progress=false"])
    assert code == 0
    for name in ("compression.csv", "compression.md", "accuracy_vs_bytes.png", "metrics.json"):
        assert (out / name).is_file(), name
    rows = _rows(out / "compression.csv")
    nern_rows = [r for r in rows if r["representation"] == "nern"]
    assert len(nern_rows) == (1 + 2) * 2 and len(rows) == len(nern_rows) + 2 * 2
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = load_config(FitConfig, base={"data": fitted_resnet8["data"]})
    splits = build_splits(cfg.data)
    for row in rows:
        path = out / "files" / row["file"]
        assert int(row["bytes"]) == path.stat().st_size
        network = NF.read_network(path)
        acc = top_k_accuracy(network, data_mod.eval_batches(splits.test, 300), (1,))["top1"]
        assert float(row["top1"]) == pytest.approx(acc, abs=1e-9), row["label"]
    original_fp32 = next(r for r in rows if r["label"] == "original-s0-fp32")
    assert float(original_fp32["top1"]) == pytest.approx(metrics["original_top1"])
    assert metrics["nern_int8_bytes"] < metrics["nern_fp32_bytes"]
    pruned = [r for r in nern_rows if float(r["sparsity"]) == 0.6]
    assert all(abs(float(r["achieved_sparsity"]) - 0.6) < 1e-3 for r in pruned)


def test_compress_refuses_a_predictor_of_another_model(fitted_resnet8, tmp_path):
    other = tmp_path / "other.safetensors"
    from nern.models import save_model

    save_model(build_model(ModelConfig(arch="resnet14", in_channels=1)), other)
    code = main(["compress", "--model", str(other), "--predictor", str(fitted_resnet8["predictor"]),
                 "--out", str(tmp_path / "x"), "--mlflow-uri", "none"])
    assert code == 2


def _decode(path, out, data):
    """`nern import` of a file `nern compress` wrote: the network rebuilt from that file alone, measured."""
    args = ["import", "--set", f"model.checkpoint={path}", "--set", "model.arch=resnet8",
            "--set", "model.in_channels=1", "--out", str(out), "--mlflow-uri", "none"]
    for key, value in data.items():
        args += ["--set", f"data.{key}={value}"]
    return main(args)


def test_import_decodes_every_file_the_compress_stage_wrote(fitted_resnet8, tmp_path):
    from nern import nnc

    out = tmp_path / "compress"
    qps = ["--nncodec-qps", "-38"] if nnc.available() else ["--nncodec-qps="]
    assert main(["compress", "--model", str(fitted_resnet8["model"]), "--predictor", str(fitted_resnet8["predictor"]),
                 "--out", str(out), "--mlflow-uri", "none", "--sparsities", "0", "--finetune", "none",
                 "--precisions", "int4", *qps, "--set", "progress=false"]) == 0
    rows = _rows(out / "compression.csv")
    assert {r["representation"] for r in rows} >= {"nern", "original"}
    x = torch.randn(4, 1, 28, 28)
    for i, row in enumerate(rows):
        head, pair, _ = row["file"].partition(".nernz+")  # a NeRN through NNCodec: its container, then bitstream
        first = out / "files" / (head + ".nernz" if pair else row["file"])
        assert _decode(first, tmp_path / f"d{i}", fitted_resnet8["data"]) == 0, row["label"]
        metrics = json.loads((tmp_path / f"d{i}" / "metrics.json").read_text())
        assert metrics["test_top1"] == pytest.approx(float(row["top1"]), abs=1e-9), row["label"]
        decoded = load_model(ModelConfig(arch="resnet8", in_channels=1,
                                         checkpoint=str(tmp_path / f"d{i}" / "model.safetensors")))
        if first.suffix == ".nernz":
            companion = first.with_suffix(".nnc")
            direct = NF.read_network(first, nnc_path=companion if companion.is_file() else None)
            with torch.no_grad():
                torch.testing.assert_close(decoded(x), direct(x))


def test_decoding_a_file_names_what_is_missing_or_wrong(fitted_resnet8, tmp_path):
    from nern import nnc

    model, rep, predictor = tiny_setup()
    path, _ = write_nern(tmp_path, predictor, {}, "int8", rep, model)
    assert main(["fit", "--model", str(path), "--out", str(tmp_path / "f"), "--mlflow-uri", "none"]) == 2
    with pytest.raises(NernError, match="nern import --set model.checkpoint="):
        load_model(ModelConfig(arch="resnet8", in_channels=1, checkpoint=str(path)))
    with pytest.raises(NernError, match="model.arch='resnet8' but the config says 'resnet14'"):
        NF.read_codec_file(path, ModelConfig(arch="resnet14", in_channels=1))
    torch.testing.assert_close(NF.read_codec_file(path, ModelConfig(arch="resnet8", in_channels=1)).state_dict(),
                               NF.read_network(path).state_dict())
    if not nnc.available():
        return
    lonely = tmp_path / "lonely.nernz"
    codec.write_container(lonely, NF.encode_nern(predictor, {}, "fp32", rep, EMBEDDING, model, parts=()))
    with pytest.raises(NernError, match="holds no predictor: it went through NNCodec"):
        NF.read_codec_file(lonely, ModelConfig(arch="resnet8", in_channels=1))


def test_the_baseline_trains_at_the_nern_fits_budget_and_is_measured_from_its_file(fitted_resnet8, tmp_path):
    out = tmp_path / "compress"
    assert main(["compress", "--model", str(fitted_resnet8["model"]), "--predictor", str(fitted_resnet8["predictor"]),
                 "--out", str(out), "--mlflow-uri", "none", "--sparsities", "0", "--finetune", "none",
                 "--precisions", "fp32", "--qat-original-bits=3", "--qat-original-sparsities=0,0.5",
                 "--qat-original-fc=int8",
                 "--set", "progress=false"]) == 0
    with open(out / "compression.csv") as fh:
        rows = list(csv.DictReader(fh))
    trained = [r for r in rows if r["representation"] == "original" and r["finetune"] == "qat"]
    assert [r["label"] for r in trained] == ["original-s0-ft-qat-int3", "original-s0.5-global-ft-qat-int3"]
    assert {r["finetune"] for r in rows if r not in trained} == {"none"}  # the untrained rows say so
    fit = load_config(FitConfig, base=read_metadata(fitted_resnet8["predictor"])["config"])  # the fit's own
    fit_metrics = (fitted_resnet8["predictor"].parent / "metrics.json").read_text()
    assert f'"distillation_iterations": {fit.iterations}' in fit_metrics
    o = fit.optim
    for row in trained:
        assert int(float(row["budget_iterations"])) == fit.iterations == int(float(row["finetune_iterations"]))
        assert int(float(row["budget_batch_size"])) == fit.data.batch_size
        assert int(float(row["budget_stream_seed"])) == fit.seed
        assert row["budget_data_free"] == str(fit.data_free)
        assert [float(row[f"budget_{k}"]) for k in ("kd", "fmd", "ce", "temperature")] == [
            fit.loss.kd, fit.loss.fmd, fit.loss.ce, fit.loss.temperature]
        assert row["budget_optimizer"] == {"ranger": "Ranger", "adam": "AdamW"}[o.name]
        assert float(row["budget_lr"]) == o.lr and float(row["budget_step_lr"]) == o.lr * o.step_lr_scale
        assert float(row["budget_weight_decay"]) == o.weight_decay and float(row["budget_min_lr"]) == o.min_lr
        assert int(float(row["budget_warmup_iterations"])) == o.warmup_iterations
        path = out / "files" / row["file"]
        assert int(row["bytes"]) == path.stat().st_size
        tensors, meta = codec.read_container(path)
        assert meta["kind"] == "network"
        for name in row["quantised"].split(","):
            assert meta["tensors"][f"state.{name}"]["codec"] == "int3"
        assert meta["tensors"]["state.linear.weight"]["codec"] == "int8"
    assert float(trained[1]["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3)
    assert original_qat.baseline_iterations(fit, 1, 0.5) == max(1, round(0.5 * fit.iterations))
