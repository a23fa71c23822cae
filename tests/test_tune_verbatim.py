"""tune_verbatim: distillation also trains the tensors NeRN stores verbatim (BatchNorm affine, FC), the predictor
file carries them and every consumer (evaluation, the codec's files, fine-tunes) uses them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nern import codec
from nern import network_files as NF
from nern.errors import NernError
from nern.reconstruct import reconstructed_model, run_reconstructed

from helpers import fashion_mnist_root  # noqa: F401 (fixture)
from test_qat import fit_resumes_exactly, quantised_fit_config


def tuned_config(root, **extra):
    return quantised_fit_config(root, bits=4, tune_verbatim=True, **extra)


def test_distillation_trains_the_verbatim_tensors_and_leaves_the_original_alone(fashion_mnist_root, tmp_path):
    from nern.fit import Fitter
    from nern.fit_setup import prepare

    cfg = tuned_config(fashion_mnist_root)
    setup = prepare(cfg)
    original = {k: v.clone() for k, v in setup.model.state_dict().items()}
    with Fitter(cfg, setup, tmp_path) as fitter:
        names = fitter.tuned.names
        owners = {type(setup.model.get_submodule(n.rpartition(".")[0])) for n in names}
        assert names and owners == {torch.nn.BatchNorm2d, torch.nn.Linear}, owners
        represented = {layer.param for layer in setup.rep.layers}
        assert not represented & set(names)
        for _ in range(cfg.rec_only_iterations):  # reconstruction only: no gradient reaches them
            fitter.step()
        assert all(torch.equal(setup.rep.tuned[n], original[n]) for n in names)
        for _ in range(cfg.iterations):
            fitter.step()
        moved = [n for n in names if not torch.equal(setup.rep.tuned[n].detach(), original[n])]
        assert len(moved) == len(names)
    assert all(torch.equal(v, original[k]) for k, v in setup.model.state_dict().items())  # the teacher


def test_the_predictor_file_and_the_codec_file_hold_the_tuned_tensors(fashion_mnist_root, tmp_path):
    from nern.config import EmbeddingConfig
    from nern.fit import Fitter
    from nern.fit_setup import prepare
    from nern.predictor_file import fitted_steps, load_predictor, save_predictor

    cfg = tuned_config(fashion_mnist_root)
    setup = prepare(cfg)
    x = torch.randn(4, 1, 28, 28)
    with Fitter(cfg, setup, tmp_path) as fitter:
        for _ in range(cfg.rec_only_iterations + cfg.iterations):
            fitter.step()
        weights = fitter.reconstructed_weights()
        with torch.no_grad():
            expected = run_reconstructed(setup.model, setup.rep, weights, x)
            untuned = run_reconstructed(setup.model, dataclasses.replace(setup.rep, tuned={}), weights, x)
        assert not torch.allclose(expected, untuned)  # the tuning matters to the function
        save_predictor(tmp_path / "p.safetensors", fitter.predictor, setup.rep, cfg, {})
    model = setup.model
    predictor, rep, fitted = load_predictor(tmp_path / "p.safetensors", model)
    assert set(rep.tuned) == set(setup.rep.tuned)
    with torch.no_grad():
        assert torch.allclose(reconstructed_model(model, rep, weights)(x), expected, atol=1e-5)
    for fold in (False, True):  # what the codec writes, read back into a fresh network
        embedding = EmbeddingConfig(fitted.embedding.levels, fitted.embedding.base)
        steps = fitted_steps(tmp_path / "p.safetensors")
        enc = NF.encode_nern(predictor, {}, "int4", rep, embedding, model, steps=steps, verbatim_precision="fp32",
                             fold=fold)
        path = tmp_path / f"n{fold}.nernz"
        codec.write_container(path, enc, "zstd")
        with torch.no_grad():
            assert torch.allclose(NF.read_network(path)(x), expected, atol=1e-4)


def test_tune_verbatim_with_best_on_validation_is_a_clear_error():
    from nern.config import FitConfig, load_config

    with pytest.raises(NernError, match="tune_verbatim.*select_best_on_val"):
        load_config(FitConfig, overrides=["tune_verbatim=true", "select_best_on_val=true"])


@pytest.mark.slow
def test_a_tuned_fit_resumes_exactly(fashion_mnist_root, tmp_path):
    cfg = tuned_config(fashion_mnist_root)
    stored = fit_resumes_exactly(cfg, tmp_path, steps_before_kill=cfg.rec_only_iterations + 2)  # into distillation
    assert any(k.startswith("tuned.") for k in stored)
