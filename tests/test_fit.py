"""Fitting end to end on real Fashion-MNIST: a user's own CNN, exact resume, data-free, warm-up, bad input."""

from __future__ import annotations

import collections
import copy
import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nern.config import DataConfig, FitConfig, PretrainConfig, load_config
from nern.data import build_splits, load_arrays, normalise
from nern.errors import NernError
from nern.fit import Fitter, fit
from nern.fit_setup import prepare
from nern.layers import conv_weights
from nern.losses import kernel_rows_reconstruction_loss
from nern.method import distillation_weights
from nern.predictor_file import decode_weights, load_predictor
from nern.pretrain import pretrain
from nern.reconstruct import reconstructed_model

from helpers import UserCNN, fashion_mnist_root  # noqa: F401 (fixture)




def tiny_data(root) -> dict:
    return {"name": "fashion_mnist", "root": str(root), "batch_size": 64, "val_size": 500, "eval_limit": 500,
            "eval_batch_size": 500, "download": False}


def tiny_fit(root, **extra) -> FitConfig:
    base = {
        "data": tiny_data(root),
        "model": {"arch": "resnet8", "in_channels": 1},
        "predictor": {"hidden": 24},
        "embedding": {"levels": 8},
        "sampling": {"batch": 256},
        "iterations": 12,
        "eval_every": 6,
        "checkpoint_every": 4,
        "progress": False,
    }
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(FitConfig, base=base)


@pytest.fixture(scope="module")
def trained_user_cnn(fashion_mnist_root, tmp_path_factory):
    """A user's CNN (conv biases, max-pool, no BN, 1x1 and 5x5 convs) trained briefly with `nern.pretrain`."""
    torch.manual_seed(0)
    model = UserCNN(in_channels=1)
    cfg = load_config(PretrainConfig, base={
        "model": {"arch": "resnet8", "in_channels": 1}, "data": {**tiny_data(fashion_mnist_root), "batch_size": 128},
        "epochs": 1.0, "lr": 0.05, "milestones": [], "progress": False, "eval_every_epochs": 1.0,
    })
    out = tmp_path_factory.mktemp("user_cnn")
    metrics = pretrain(cfg, out, model=model)
    assert metrics["test_top1"] > 40  # real training on real data, far above 10% chance
    return model.eval()


@pytest.mark.slow
def test_user_cnn_permute_fit_evaluate_without_new_classes(trained_user_cnn, fashion_mnist_root, tmp_path):
    from nern.permutation import compute_permutations

    model = trained_user_cnn
    cfg = tiny_fit(fashion_mnist_root, iterations=30, predictor={"hidden": 48}, sampling={"method": "all"})
    layers = prepare(cfg, model=model).rep.layers
    perms = compute_permutations(conv_weights(model, layers), "crossfilter", progress=False)
    metrics = fit(cfg, tmp_path, model=model, permutation=perms)
    assert metrics["represented_layers"] == 3  # the 5x5 conv is copied verbatim
    assert metrics["permutation_bytes"] > 0
    assert math.isfinite(metrics["reconstructed_top1"]) and metrics["original_top1"] > 40
    # evaluate: rebuild from the file written to disk, with the permutation read back from it
    predictor, rep, saved_cfg = load_predictor(tmp_path / "predictor.safetensors", model)
    assert all(torch.equal(a, b.long()) for a, b in zip(rep.positions, perms))
    rebuilt = reconstructed_model(model, rep, decode_weights(predictor, rep, saved_cfg))
    x = torch.randn(4, 1, 28, 28)
    assert rebuilt(x).shape == (4, 10)
    first = dict(rebuilt.named_parameters())["features.0.weight"]
    assert torch.equal(first, dict(model.named_parameters())["features.0.weight"])  # unrepresented: verbatim


@pytest.mark.slow
def test_fit_improves_reconstruction_and_writes_outputs(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, iterations=40, sampling={"method": "all"}, optim={"lr": 1e-2})
    setup = prepare(cfg)
    fitter = Fitter(cfg, setup, tmp_path)
    first = fitter.step()["rec"]
    metrics = fitter.run()
    with open(tmp_path / "curves.csv") as fh:
        assert float(list(csv.DictReader(fh))[-1]["rec"]) < first
    for name in ("predictor.safetensors", "metrics.json", "curves.csv"):
        assert (tmp_path / name).is_file()
    for key in ("original_top1", "reconstructed_top1", "predictor_params", "represented_params", "size_ratio",
                "iterations", "wall_seconds", "seconds_per_iteration"):
        assert key in metrics
    assert metrics["iterations"] == 40


def test_a_fit_with_a_reconstruction_phase_evaluates_at_its_end_and_counts_eval_every_from_there(
        fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, iterations=6, eval_every=4, rec_only_iterations=5)
    with Fitter(cfg, prepare(cfg), tmp_path) as fitter:
        fitter.run()
    with open(tmp_path / "curves.csv") as fh:
        evals = [int(r["iteration"]) for r in csv.DictReader(fh) if r["eval_val_top1"]]
    assert evals == [5, 9, 11]  # none during reconstruction, its end, then every 4, and the last iterate


def test_fit_measures_validation_while_fitting_and_the_test_set_once_at_the_end(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, iterations=12, eval_every=4, select_best_on_val=True)
    with Fitter(cfg, prepare(cfg), tmp_path) as fitter:
        fitter.run()
    with open(tmp_path / "curves.csv") as fh:
        evals = [r for r in csv.DictReader(fh) if r["eval_val_top1"]]
    assert [int(r["iteration"]) for r in evals] == [4, 8, 12]
    assert [bool(r["eval_test_top1"]) for r in evals] == [False, False, True]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["reconstructed_top1"] > 0 and metrics["best_val_test_top1"] > 0  # the best iterate got a test
    no_val = tiny_fit(fashion_mnist_root, iterations=8, eval_every=4, data={"val_size": 0})
    with Fitter(no_val, prepare(no_val), tmp_path / "noval") as fitter:
        fitter.run()
    with open(tmp_path / "noval" / "curves.csv") as fh:
        assert [bool(r["eval_test_top1"]) for r in csv.DictReader(fh) if r["eval_rec_rmse"]] == [True, True]


def test_kernel_rows_loss_on_every_row_is_the_rmse_of_the_placed_weights(fashion_mnist_root, tmp_path):
    """The minibatch reconstruction-only step measures the same L_rec as a full step (normalised space, stored
    scales, and the zero padding of the 1x1 shortcut kernels masked out)."""
    cfg = tiny_fit(fashion_mnist_root, rec_only_iterations=4, rec_only_batch=32, model={"shortcut": "B"},
                   loss={"rec_space": "normalized"}, predictor={"normalize_targets": True})
    with Fitter(cfg, prepare(cfg), tmp_path) as fitter:
        assert any(layer.shape[-1] == 1 for layer in fitter.s.rep.layers)  # a padded kernel is in the test
        with torch.no_grad():
            full = fitter.reconstruction(fitter.predict_weights(None))
            emb, target, factor, mask = fitter.rec_rows.select(fitter.s.embeddings, None)
            rows = kernel_rows_reconstruction_loss(fitter.predictor(emb) * factor, target, mask)
        assert float(rows) == pytest.approx(float(full), rel=1e-5)
        assert float(mask.sum()) == sum(w.numel() for w in fitter.originals)


def test_minibatch_reconstruction_steps_learn_and_resume_exactly(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, iterations=2, rec_only_iterations=30, rec_only_batch=64,
                   optim={"lr": 1e-2, "rec_only_lr": 1e-2})
    setup = prepare(cfg)
    with Fitter(cfg, setup, tmp_path / "a") as straight:
        rows = copy.deepcopy(straight.rec_rows.sampler).sample()
        assert len(rows) == 64 and len(set(rows.tolist())) == 64  # a subset of the rows, none twice
        with torch.no_grad():
            first = float(straight.reconstruction(straight.predict_weights(None)))
        for _ in range(30):
            straight.step()
        with torch.no_grad():
            assert float(straight.reconstruction(straight.predict_weights(None))) < 0.95 * first  # on every kernel
    with Fitter(cfg, setup, tmp_path / "b") as before:
        for _ in range(15):
            before.step()
        state = copy.deepcopy(before.state_dict())
    with Fitter(cfg, setup, tmp_path / "c") as resumed:
        resumed.load_state_dict(state)
        for _ in range(15):
            resumed.step()
        for a, b in zip(straight.predictor.parameters(), resumed.predictor.parameters()):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_resume_from_checkpoint_is_exact(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root)
    straight = fit(cfg, tmp_path / "straight")
    # interrupted run: stop after 8 iterations (a checkpoint exists at 8), then resume in a fresh Fitter
    setup = prepare(cfg)
    partial = Fitter(cfg, setup, tmp_path / "resumed")
    partial.original_acc = partial.evaluate_original()
    for _ in range(8):
        partial.step()
    partial.training_loop().save()
    for _ in range(2):  # work after the checkpoint that the kill loses
        partial.step()
    resumed = Fitter(cfg, prepare(cfg), tmp_path / "resumed").run()
    assert resumed["resumed"] is True
    assert resumed["reconstructed_top1"] == straight["reconstructed_top1"]
    assert resumed["final_loss"] == straight["final_loss"]
    from nern.artifacts import load_tensors

    a, _ = load_tensors(tmp_path / "straight" / "predictor.safetensors")
    b, _ = load_tensors(tmp_path / "resumed" / "predictor.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()  # a finished run leaves no checkpoint


def test_checkpoint_of_other_config_is_refused(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, iterations=4)
    interrupted = Fitter(cfg, prepare(cfg), tmp_path)
    interrupted.step()
    interrupted.training_loop().save()  # killed after its first checkpoint
    with pytest.raises(NernError, match="another config"):
        fit(tiny_fit(fashion_mnist_root, iterations=4, predictor={"hidden": 32}), tmp_path)


class NoImages:
    """Stands in for the training split of a data-free fit: reading any of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a data-free fit read the training split ({name})")

    def __len__(self):
        raise AssertionError("a data-free fit read the training split (len)")


def test_data_free_fit_runs_on_noise_and_evaluates_on_real_test_set(fashion_mnist_root, tmp_path):
    """Every batch the networks see while fitting is fresh i.i.d. U[-2, 2] noise in normalised input space (real
    Fashion-MNIST normalises into [-1, 1]); no training image is read; evaluation is on the real test set."""
    cfg = tiny_fit(fashion_mnist_root, data_free=True, iterations=4, eval_every=0)
    setup = prepare(cfg)
    setup = replace(setup, splits=replace(setup.splits, train=NoImages()))
    seen = []
    hook = setup.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    metrics = Fitter(cfg, setup, tmp_path).run()
    hook.remove()
    assert metrics["data_free"] is True
    real_test = normalise(setup.splits.test.images, setup.splits.test.info)
    assert any(torch.equal(x, real_test) for x in seen if x.shape == real_test.shape)  # evaluated on it
    batches = [x for x in seen if x.shape[0] == cfg.data.batch_size]  # evaluation batches hold 500 images
    assert len(batches) >= 2 * 4  # teacher and student, every iteration
    noise = torch.stack(batches[::2])
    assert noise.shape[1:] == (cfg.data.batch_size, 1, 28, 28) and len(noise.unique(dim=0)) == len(noise)
    assert torch.equal(batches[0], batches[1])  # the student sees the teacher's batch
    values = noise.flatten().double()
    assert -2 <= values.min() < -1.99 and 1.99 < values.max() <= 2
    assert abs(values.mean()) < 0.02 and abs(values.var() - 16 / 12) < 0.03  # U[-2, 2]: mean 0, variance 4/3
    counts = torch.histc(values, bins=8, min=-2, max=2)
    assert (counts / counts.mean() - 1).abs().max() < 0.05  # flat over [-2, 2]
    pixels = noise.flatten(2).double()  # independent pixels: no correlation between neighbours
    assert abs(torch.corrcoef(torch.stack([pixels[..., :-1].flatten(), pixels[..., 1:].flatten()]))[0, 1]) < 0.02


def test_warmup_and_rec_only_phase_zero_the_distillation():
    cfg = load_config(FitConfig, base={"loss": {"warmup": 10}, "rec_only_iterations": 20})
    assert distillation_weights(cfg, 5) == (0.0, 0.0, 0.0)
    assert distillation_weights(cfg, 29) == (0.0, 0.0, 0.0)  # the warm-up counts from the end of the rec-only phase
    assert distillation_weights(cfg, 30) == (cfg.loss.kd, cfg.loss.fmd, cfg.loss.ce)


def test_rec_only_phase_has_its_own_schedule_and_restarts_the_optimiser(fashion_mnist_root, tmp_path):
    """Two cosine cycles (peaks rec_only_lr then lr), fresh optimiser moments at the switch, no images read
    before it, and `iterations` counting the distillation iterations only."""
    cfg = tiny_fit(fashion_mnist_root, iterations=6, rec_only_iterations=4,
                   optim={"lr": 1e-3, "rec_only_lr": 1e-2, "min_lr": 1e-6})
    fitter = Fitter(cfg, prepare(cfg), tmp_path)
    assert fitter.total == 10
    position = lambda: {k: v for k, v in fitter.stream.state_dict().items() if k != "generator"}  # noqa: E731
    start = position()
    lrs, losses = [], []
    for _ in range(10):
        if fitter.iteration == 4:
            assert position() == start  # the rec-only phase read no images
        losses.append(fitter.step())
        lrs.append(losses[-1]["lr"])
        if fitter.iteration == 5:  # the first distillation step ran on fresh moments
            steps = {float(st["step"]) for st in fitter.optimizer.state.values()}
            assert steps == {1.0}
    assert lrs[0] == pytest.approx(1e-2) and lrs[4] == pytest.approx(1e-3)
    assert lrs[3] < lrs[0] / 2 and lrs[9] < lrs[4] / 2
    assert all(x["kd"] == 0 and x["fmd"] == 0 for x in losses[:4])
    assert all(x["fmd"] > 0 for x in losses[4:])
    with pytest.raises(NernError, match="optim.rec_only_lr"):
        tiny_fit(fashion_mnist_root, optim={"rec_only_lr": -1.0})
    with pytest.raises(NernError, match="rec_only_iterations"):
        tiny_fit(fashion_mnist_root, rec_only_iterations=-1)


def test_a_rebuilt_optimiser_continues_the_schedule_where_the_fit_is(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, iterations=6, rec_only_iterations=4,
                   optim={"lr": 1e-3, "rec_only_lr": 1e-2, "min_lr": 1e-6})
    straight, rebuilt = Fitter(cfg, prepare(cfg), tmp_path / "a"), Fitter(cfg, prepare(cfg), tmp_path / "b")
    lrs = {"straight": [], "rebuilt": []}
    for i in range(8):
        if i == 5:
            rebuilt.rebuild_optimizer()
        lrs["straight"].append(straight.step()["lr"])
        lrs["rebuilt"].append(rebuilt.step()["lr"])
    assert lrs["rebuilt"] == pytest.approx(lrs["straight"])
    straight.close()
    rebuilt.close()


def test_gradient_clipping_caps_the_update_and_reports_the_raw_norm(fashion_mnist_root, tmp_path):
    """Both fitters see identical gradients at step 0; only the clipped one must rescale them to the cap."""
    seen = {}
    for name, cap in (("free", None), ("clipped", 1e-3)):
        cfg = tiny_fit(fashion_mnist_root, iterations=4, optim={"clip_grad_norm": cap})
        fitter = Fitter(cfg, prepare(cfg), tmp_path / name)
        step_grads = []
        fitter.optimizer.register_step_pre_hook(
            lambda opt, *_: step_grads.append(torch.nn.utils.get_total_norm(
                [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None])))
        seen[name] = (fitter.step()["grad_norm"], float(step_grads[0]))
    (free_reported, free_applied), (clipped_reported, clipped_applied) = seen["free"], seen["clipped"]
    assert free_reported == pytest.approx(clipped_reported, rel=1e-5) and free_reported > 1e-2
    assert free_applied == pytest.approx(free_reported, rel=1e-5)
    assert clipped_applied == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(NernError, match="optim.clip_grad_norm"):
        tiny_fit(fashion_mnist_root, optim={"clip_grad_norm": 0})


def test_label_term_reaches_the_predictor_only_when_weighted(fashion_mnist_root, tmp_path):
    """loss.ce alone (no rec, kd or fmd) still trains the predictor through the student; at 0 nothing does."""
    grads = {}
    for ce in (0.0, 1.0):
        cfg = tiny_fit(fashion_mnist_root, iterations=2, loss={"rec": 0.0, "kd": 0.0, "fmd": 0.0, "ce": ce})
        fitter = Fitter(cfg, prepare(cfg), tmp_path / str(ce))
        norms = []
        fitter.optimizer.register_step_pre_hook(lambda opt, *_: norms.append(sum(
            float(p.grad.norm()) for g in opt.param_groups for p in g["params"] if p.grad is not None)))
        logged = fitter.step()
        grads[ce] = (logged["ce"], norms[0])
    assert grads[0.0] == (0.0, 0.0)
    ce_value, grad_norm = grads[1.0]
    assert ce_value > 0 and math.isfinite(ce_value) and grad_norm > 0  # an untrained student: a large CE


def test_nan_loss_is_a_user_error_and_writes_no_output(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, iterations=4)
    setup = prepare(cfg)
    setup.originals[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(NernError, match="(?i)nan"):
        Fitter(cfg, setup, tmp_path).run()
    assert not (tmp_path / "metrics.json").exists()


def test_grey_data_into_rgb_model_is_refused(fashion_mnist_root, tmp_path):
    cfg = tiny_fit(fashion_mnist_root, model={"in_channels": 3})
    with pytest.raises(NernError, match="channel"):
        prepare(cfg)


def _image_counts(images: torch.Tensor) -> collections.Counter:
    return collections.Counter(bytes(row) for row in images.flatten(1).numpy())


def test_splits_validation_is_carved_from_train(fashion_mnist_root):
    """val is val_size images of the TRAIN split, disjoint from the training subset (the two together are the
    train split exactly, duplicates counted), chosen by data.split_seed; the test set is the test split's."""
    cfg = DataConfig(**tiny_data(fashion_mnist_root))
    splits = build_splits(cfg)
    assert len(splits.val) == 500 and len(splits.test) == 500
    train_split, train_labels = load_arrays(cfg, "train")
    full = _image_counts(train_split)
    val = _image_counts(splits.val.images)
    assert len(splits.train) + len(splits.val) == len(train_split)
    assert _image_counts(splits.train.images) + val == full  # a partition of the train split
    assert sorted(splits.val.labels.tolist() + splits.train.labels.tolist()) == sorted(train_labels.tolist())
    test_split = _image_counts(load_arrays(cfg, "test")[0])
    assert not _image_counts(splits.test.images) - test_split  # test images come from the test split
    assert not val & test_split  # Fashion-MNIST repeats no image between its splits
    again = build_splits(cfg)
    assert torch.equal(again.val.images, splits.val.images) and torch.equal(again.train.images, splits.train.images)
    other = build_splits(replace(cfg, split_seed=1))
    assert _image_counts(other.val.images) != val and _image_counts(other.train.images) + _image_counts(
        other.val.images) == full


def test_normalized_reconstruction_error_weighs_each_layer_by_its_own_scale(fashion_mnist_root, tmp_path):
    """rec_space=normalized: an error of c standard deviations in every layer costs c, whatever the layer's
    weight scale; the raw RMSE of the same error is dominated by the layers with large weights."""
    cfg = tiny_fit(fashion_mnist_root, loss={"rec_space": "normalized"})
    setup = prepare(cfg)
    fitter = Fitter(cfg, setup, tmp_path)
    torch.manual_seed(0)
    noisy = [o + 0.1 * o.std() * torch.sign(torch.randn_like(o)) for o in fitter.originals]
    assert math.isclose(float(fitter.reconstruction(noisy)), 0.1, rel_tol=1e-3)
    raw = Fitter(tiny_fit(fashion_mnist_root), setup, tmp_path / "raw")
    stds = torch.tensor([float(o.std()) for o in raw.originals])
    counts = torch.tensor([o.numel() for o in raw.originals], dtype=torch.float)
    expected_raw = 0.1 * math.sqrt(float((stds**2 * counts).sum() / counts.sum()))
    assert math.isclose(float(raw.reconstruction(noisy)), expected_raw, rel_tol=1e-3)


@pytest.mark.compile
@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_iteration_computes_the_same_losses_and_gradients_as_eager(fashion_mnist_root):
    """compile=true (one fused fx graph per network, issue #3's throughput work) must not change the method:
    the same predictor, batch and sampled kernels give the same rec/KD/FMD and the same predictor update."""
    cfg = tiny_fit(fashion_mnist_root, loss={"kd": 1.0, "fmd": 1.0})
    setup = prepare(cfg)
    eager = Fitter(cfg, setup, fashion_mnist_root / "unused")
    eager.close()  # no hooks left on the shared model: the compiled graph must find its maps on its own
    compiled = Fitter(replace(cfg, compile=True), setup, fashion_mnist_root / "unused")
    assert compiled.networks.fused  # the fused path, not the hook fallback
    eager = Fitter(cfg, setup, fashion_mnist_root / "unused")
    for _ in range(2):
        a, b = eager.step(), compiled.step()
        for key in ("rec", "kd", "fmd"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
        assert a["kd"] > 0 and a["fmd"] > 0
    for p, q in zip(eager.predictor.parameters(), compiled.predictor.parameters()):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-5)


def test_compile_without_a_cxx_compiler_is_a_user_error(fashion_mnist_root, monkeypatch):
    import shutil as shutil_mod

    monkeypatch.setattr(shutil_mod, "which", lambda name: None)
    cfg = tiny_fit(fashion_mnist_root, compile=True)
    with pytest.raises(NernError, match="C\\+\\+ compiler"):
        Fitter(cfg, prepare(cfg), fashion_mnist_root / "unused")


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_fit_removes_its_hooks_from_the_users_model_when_it_returns_and_when_it_raises(fashion_mnist_root, tmp_path):
    model = UserCNN(in_channels=1)
    cfg = tiny_fit(fashion_mnist_root, iterations=2, eval_every=0, loss={"kd": 1.0, "fmd": 1.0})
    fit(cfg, tmp_path / "ok", model=model)
    assert _hooks(model) == 0
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = float("nan")  # a represented layer: the first loss is NaN
    with pytest.raises(NernError, match="(?i)nan"):
        fit(cfg, tmp_path / "nan", model=model)
    assert _hooks(model) == 0


def test_the_paper_recipe_departs_from_nothing_and_the_fast_recipe_lists_its_switches():
    from nern.method import DEPARTURES, departures

    root = Path(__file__).resolve().parents[1] / "config" / "recipes"
    assert departures(load_config(FitConfig, root / "paper.yaml")) == {}
    fast = departures(load_config(FitConfig, root / "fast.yaml"))
    assert fast == {"rec_only_iterations": 4800, "rec_only_batch": 4096, "loss.rec_space": "normalized",
                    "predictor.normalize_targets": True,
                    "predictor.init": "variance", "sampling.method": "all", "optim.clip_grad_norm": 10.0,
                    "autocast_bf16": "reconstruction"}
    assert all(d.why for d in DEPARTURES)


def test_a_fit_reports_agreement_with_its_original_on_the_test_set_and_on_validation_while_fitting(
        fashion_mnist_root, tmp_path):
    """metrics.json's agreement / KL equal a recomputation from the saved predictor file; the curves carry the
    validation agreement at every evaluation."""
    from nern.data import eval_batches
    from nern.evaluate import agreement, predictions
    from nern.reconstruct import run_reconstructed

    cfg = tiny_fit(fashion_mnist_root, iterations=8, eval_every=4)
    setup = prepare(cfg)
    with Fitter(cfg, setup, tmp_path) as fitter:
        metrics = fitter.run()
    assert 0.0 <= metrics["agreement"] <= 100.0 and metrics["kl_to_original"] >= 0.0
    assert metrics["val_agreement"] is not None
    predictor, rep, stored = load_predictor(tmp_path / "predictor.safetensors", setup.model)
    weights = decode_weights(predictor, rep, stored)
    batches = lambda: eval_batches(setup.splits.test, cfg.data.eval_batch_size)  # noqa: E731
    original = predictions(setup.model, batches())
    rebuilt = predictions(lambda x: run_reconstructed(setup.model, rep, weights, x), batches())
    again = agreement(original, rebuilt)
    assert again["agreement"] == pytest.approx(metrics["agreement"], abs=1e-9)
    assert again["kl_to_original"] == pytest.approx(metrics["kl_to_original"], rel=1e-5, abs=1e-9)
    assert rebuilt.top1() == pytest.approx(metrics["reconstructed_top1"], abs=1e-9)
    with open(tmp_path / "curves.csv") as fh:
        evals = [r for r in csv.DictReader(fh) if r["eval_val_top1"]]
    assert [bool(r["eval_val_agreement"]) for r in evals] == [True, True]


def test_the_validation_split_is_fixed_by_split_seed_not_by_the_fit_seed(fashion_mnist_root, tmp_path):
    """Two fits with different seeds measure their originals on the same validation images (docs/PROTOCOL.md)."""
    a = tiny_fit(fashion_mnist_root, seed=0)
    b = tiny_fit(fashion_mnist_root, seed=3)
    va, vb = prepare(a).splits.val, prepare(b).splits.val
    assert torch.equal(va.images, vb.images) and torch.equal(va.labels, vb.labels)
    moved = tiny_fit(fashion_mnist_root, seed=0, data={"split_seed": 1})
    assert not torch.equal(prepare(moved).splits.val.images, va.images)


@pytest.mark.parametrize("setting", [True, "auto"])
def test_a_bf16_fit_trains_fp32_parameters_and_records_what_ran(fashion_mnist_root, tmp_path, setting):
    """autocast_bf16: the predictor's parameters stay fp32 and move; metrics.json says whether bf16 ran ('auto'
    resolved by bf16_native on this machine)."""
    from nern.config import bf16_native

    cfg = tiny_fit(fashion_mnist_root, iterations=3, eval_every=0, autocast_bf16=setting)
    with Fitter(cfg, prepare(cfg), tmp_path) as fitter:
        before = [p.detach().clone() for p in fitter.predictor.parameters()]
        metrics = fitter.run()
        after = list(fitter.predictor.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert metrics["bf16"] is (True if setting is True else bf16_native("cpu"))
    assert metrics["bf16_reconstruction"] is metrics["bf16"]
    assert torch.isfinite(torch.tensor(metrics["rec_rmse"]))


def test_reconstruction_only_bf16_autocasts_the_reconstruction_steps_and_not_distillation(fashion_mnist_root,
                                                                                          tmp_path, monkeypatch):
    """autocast_bf16=reconstruction: the predictor runs in bf16 in the minibatch reconstruction-only steps and in
    fp32 once distillation starts (bf16 lowered agreement there, docs/results/cifar10-cpu-r20-bf16)."""
    import nern.config as config_mod

    monkeypatch.setattr(config_mod, "bf16_native", lambda device: True)  # as on an AVX512-BF16 CPU
    cfg = tiny_fit(fashion_mnist_root, iterations=2, eval_every=0, autocast_bf16="reconstruction",
                   rec_only_iterations=2, rec_only_batch=64)
    dtypes: list[torch.dtype] = []
    with Fitter(cfg, prepare(cfg), tmp_path) as fitter:
        hook = fitter.predictor.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        metrics = fitter.run()
        hook.remove()
    assert metrics["bf16_reconstruction"] is True and metrics["bf16"] is False
    assert dtypes[:2] == [torch.bfloat16, torch.bfloat16]  # the two reconstruction-only steps
    assert torch.float32 in dtypes[2:] and torch.bfloat16 not in dtypes[2:]  # distillation and evaluation
