"""Training the original network through the shared loop: a run killed between two checkpoints and rerun ends
bit for bit like an uninterrupted one, and its tracker receives every point exactly once."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from nern.artifacts import load_tensors
from nern.config import PretrainConfig, load_config
from nern.errors import NernError
from nern.pretrain import Pretraining, pretrain

from helpers import Recorder, fashion_mnist_root  # noqa: F401 (fixture)

TIMING = {"wall_seconds", "seconds_per_iteration"}


class Killed(Exception):
    """Stands for SIGKILL: nothing after it is saved or logged."""


def dies_at(iteration: int):
    """Pretraining.step, raising Killed when it reaches `iteration` (nothing after it is saved or logged)."""
    real_step = Pretraining.step

    def step(self):
        if self.iteration == iteration:
            raise Killed
        return real_step(self)

    return step


def tiny_pretrain(root) -> PretrainConfig:
    data = {"name": "fashion_mnist", "root": str(root), "batch_size": 64, "val_size": 500, "eval_limit": 300,
            "eval_batch_size": 300, "download": False}
    # 930 batches per epoch: 28 iterations, evaluated every 9, checkpoints at 8, 16, 24
    return load_config(PretrainConfig, base={"data": data, "model": {"arch": "resnet8", "in_channels": 1},
                                             "epochs": 0.03, "eval_every_epochs": 0.01, "checkpoint_every": 8,
                                             "milestones": [0.02], "smoothness": 1e-3, "progress": False})


def test_pretrain_killed_between_checkpoints_resumes_exactly_and_logs_each_point_once(fashion_mnist_root, tmp_path,
                                                                                      monkeypatch):
    cfg = tiny_pretrain(fashion_mnist_root)
    straight = Recorder()
    expected = pretrain(cfg, tmp_path / "straight", tracker=straight)
    assert expected["iterations"] == 28

    monkeypatch.setattr(Pretraining, "step", dies_at(20))
    first = Recorder()
    with pytest.raises(Killed):
        pretrain(cfg, tmp_path / "resumed", tracker=first)
    # rows at 9 (evaluated) and 10 reached the tracker with the checkpoint at 16; 18 and 20 died with the process
    assert {step for _, step, _ in first.points} == {9, 10}
    monkeypatch.undo()
    second = Recorder()
    got = pretrain(cfg, tmp_path / "resumed", tracker=second)

    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING}  # noqa: E731
    assert strip(got) == strip(expected)
    a, _ = load_tensors(tmp_path / "straight" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics included
    assert (tmp_path / "straight" / "curves.csv").read_text() == (tmp_path / "resumed" / "curves.csv").read_text()
    logged = first.points + second.points
    assert len(logged) == len({(name, step) for name, step, _ in logged}), "a replayed point was logged twice"
    assert sorted(logged, key=str) == sorted(straight.points, key=str)
    assert {name for name, _, _ in logged} == {"epoch", "loss", "ce", "val_top1"}
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["iterations"] == 28


def test_pretrain_from_a_checkpoint_starts_from_its_weights_not_the_init(fashion_mnist_root, tmp_path):
    """Fine-tuning (model.checkpoint set): the first step starts from the given weights; without it, from the
    architecture's seeded init."""
    pretrain(tiny_pretrain(fashion_mnist_root), tmp_path / "base")
    start = tmp_path / "base" / "model.safetensors"
    cfg = tiny_pretrain(fashion_mnist_root)
    cfg.model.checkpoint = str(start)
    cfg.epochs = 0.001  # one step at most: the result stays close to the start
    cfg.smoothness = 0.0
    tuned = pretrain(cfg, tmp_path / "tuned")
    assert tuned["start_checkpoint"] == str(start)
    s, _ = load_tensors(start)
    t, _ = load_tensors(tmp_path / "tuned" / "model.safetensors")
    scratch = tiny_pretrain(fashion_mnist_root)
    scratch.epochs, scratch.smoothness = 0.001, 0.0
    pretrain(scratch, tmp_path / "scratch")
    r, _ = load_tensors(tmp_path / "scratch" / "model.safetensors")
    conv = next(k for k in s if k.endswith("conv1.weight"))
    assert (t[conv] - s[conv]).norm() < 0.1 * (r[conv] - s[conv]).norm()


@pytest.mark.slow
def test_a_fine_tune_killed_midway_resumes_exactly(fashion_mnist_root, tmp_path, monkeypatch):
    start_cfg = tiny_pretrain(fashion_mnist_root)
    start_cfg.epochs = 0.01
    pretrain(start_cfg, tmp_path / "start")
    cfg = tiny_pretrain(fashion_mnist_root)
    cfg.model.checkpoint = str(tmp_path / "start" / "model.safetensors")
    expected = pretrain(cfg, tmp_path / "straight")
    monkeypatch.setattr(Pretraining, "step", dies_at(20))
    with pytest.raises(Killed):
        pretrain(cfg, tmp_path / "resumed")
    monkeypatch.undo()
    got = pretrain(cfg, tmp_path / "resumed")
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING}  # noqa: E731
    assert strip(got) == strip(expected)
    a, _ = load_tensors(tmp_path / "straight" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fine_tune_from_weights_of_another_architecture_is_refused(fashion_mnist_root, tmp_path):
    start_cfg = tiny_pretrain(fashion_mnist_root)
    start_cfg.epochs = 0.001
    pretrain(start_cfg, tmp_path / "start")
    cfg = tiny_pretrain(fashion_mnist_root)
    cfg.model.checkpoint = str(tmp_path / "start" / "model.safetensors")
    cfg.model.arch = "resnet20"
    with pytest.raises(NernError, match="model.arch"):
        pretrain(cfg, tmp_path / "bad")


def test_channels_last_takes_the_same_step_and_saves_the_usual_layout(fashion_mnist_root, tmp_path):
    """channels_last (an option; 1.03x the images/s on a quiet CPU) changes the memory layout only: one step from the
    same weights on the same batch moves every tensor the same way (up to summation order, which BatchNorm's
    cancelling gradients amplify to ~1% of a step), and the saved model is contiguous."""
    from nern import data as data_mod
    from nern.models import build_model

    cfg = tiny_pretrain(fashion_mnist_root)
    cfg.smoothness = 0.0
    splits = data_mod.build_splits(cfg.data)
    torch.manual_seed(0)
    init = build_model(cfg.model)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    moved = {}
    for layout in (True, False):
        cfg.channels_last = layout
        model = copy.deepcopy(init)
        run = Pretraining(cfg, model, splits)
        assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last) == layout
        run.step()
        moved[layout] = {k: v.float() - before[k].float() for k, v in model.state_dict().items()}
    for key, step in moved[False].items():
        scale = step.abs().max().item()
        assert (moved[True][key] - step).abs().max().item() <= 0.05 * scale + 1e-6, key
    cfg.channels_last, cfg.epochs = True, 0.005
    pretrain(cfg, tmp_path / "run")
    saved, _ = load_tensors(tmp_path / "run" / "model.safetensors")
    assert all(tensor.is_contiguous() for tensor in saved.values())


def test_bf16_autocast_step_stays_close_to_fp32_and_keeps_fp32_weights(fashion_mnist_root, tmp_path):
    """autocast_bf16 computes forward/backward in bfloat16 but SGD updates fp32 weights: one step from the same
    weights moves them like the fp32 step (within bf16's precision), and the run records what it used."""
    from nern import data as data_mod
    from nern.models import build_model

    cfg = tiny_pretrain(fashion_mnist_root)
    cfg.smoothness = 0.0
    splits = data_mod.build_splits(cfg.data)
    torch.manual_seed(0)
    init = build_model(cfg.model)
    before = {k: v.clone() for k, v in init.state_dict().items() if v.is_floating_point()}
    moved = {}
    for bf16 in (True, False):
        cfg.autocast_bf16 = bf16
        model = copy.deepcopy(init)
        run = Pretraining(cfg, model, splits)
        assert run.bf16 is bf16
        run.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        moved[bf16] = {k: v - before[k] for k, v in model.state_dict().items() if k in before}
    conv = next(k for k in moved[False] if k.endswith("conv1.weight"))
    step = moved[False][conv]
    assert 0 < (moved[True][conv] - step).norm() <= 0.2 * step.norm()  # different arithmetic, the same step
    cfg.autocast_bf16, cfg.epochs = "auto", 0.005
    metrics = pretrain(cfg, tmp_path / "run")
    from nern.config import bf16_native
    assert metrics["bf16"] is bf16_native("cpu")
