"""Meta-compression of a fitted NeRN (docs/METHOD.md §9), measured in bytes on disk against codecs on the original.

The paper prunes the predictor and reports parameter counts. A parameter count hides what a file needs besides
the predictor (permutations, per-layer scales, BatchNorm, the FC layer, unrepresented convs) and what a
general-purpose compressor would do to the original network anyway. So every variant here is a real file
(`nern.network_files` decides what goes in, `nern.codec`'s container how: lossless(safetensors(encoded
tensors, JSON metadata))):

- a NeRN file holds the predictor (pruned and/or quantised), the permutations, the per-layer scales and every
  tensor NeRN does not represent;
- the same tensor codecs write the baselines (the ORIGINAL network at fp32/fp16/intN, magnitude-pruned at the
  same sparsities), so both sides pay for the same things under the same lossless compressor (zstd or lzma);
- NNCodec (`nern.nnc`, the ISO/IEC 15938-17 codec a user would pick instead) writes the original network at a
  grid of quantisation parameters, and the predictor with the verbatim tensors ("nern+nnc": its bitstream plus
  a container with the permutations and scales; the row's bytes are both files').

Every accuracy in the table is measured on a network rebuilt from the file READ BACK from disk, starting from
a freshly initialised skeleton, so nothing of the original network can leak into a NeRN row.

The predictor is pruned by weight magnitude (Linear weights, not biases; `nern.pruning`), globally or per
layer, then optionally fine-tuned with the fit's own losses (`nern.fit.Fitter`) with the mask held fixed
(gradients of pruned weights are zeroed and the mask is re-applied after every step), on task images or on
noise (data-free), and finally quantised. Post-training quantisation below 8 bits destroys a predictor, so
`qat_bits` adds quantisation-aware fine-tunes (`nern.qat`: learnt steps, straight-through rounding, the fit's
objective, the pruning mask held) whose integers and steps the file stores exactly.

The NeRN file is trained; PTQ and NNCodec of the original are not (finetune `none`: no retraining). The fair
baseline at equal budget, `qat_original_bits`, trains the original network itself through the same quantisers with
the fit's data, losses, optimiser and distillation iterations (`nern.original_qat`; finetune `qat`, its budget in
the row's budget_* columns) and stores exactly its integers in an original-network file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nern.artifacts import atomic_path, write_json
from nern.codec import COMPRESSORS, FILE_SUFFIX, PRECISIONS, Encoded, write_container
from nern.config import FitConfig, flatten, to_dict
from nern.errors import NernError
from nern.fit import Fitter
from nern.fit_setup import prepare
from nern.layers import ConvLayer, conv_weights
from nern.losses import reconstruction_loss
from nern.evaluate import Predictions
from nern.measure import pareto_front, split_fidelity, split_predictions
from nern.network_files import (
    encode_network,
    encode_nern,
    fresh_skeleton,
    read_network,
    read_nnc_network,
    verbatim_state,
)
from nern.nnc import available as nnc_available
from nern.original_qat import masked_parameters, train_original, unquantised_precisions
from nern.nnc import NNC_SUFFIX, float_tensors, write_nnc
from nern.plots import pyplot, save_figure
from nern.predictor import Predictor
from nern.predictor_file import NON_RESULT_KEYS, fitted_steps
from nern.qat import MAX_BITS, MIN_BITS, attach_quantisers, detach_quantisers, learnt_steps
from nern.pruning import (
    SCOPES,
    apply_masks,
    magnitude_masks,
    mask_parameters,
    mask_sparsity,
    prunable_network_weights,
    pruned_predictor,
)
from nern.reconstruct import Representation
from nern.runs import add_stage_arguments, comma_floats, comma_names, load_fitted, log_outputs, stage_run
from nern.table_format import to_markdown

FINETUNES = ("none", "data", "data-free")


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning a pruned predictor with the fit's losses


def finetune_config(cfg: FitConfig, iterations: int, lr: float, data_free: bool) -> FitConfig:
    """The fit's config for a short fine-tune: same losses (distillation on from step 0), cosine from `lr`."""
    return dataclasses.replace(
        cfg, iterations=iterations, epochs=None, data_free=data_free, eval_every=0, checkpoint_every=0,
        rec_only_iterations=0, compile=False, progress=False, select_best_on_val=False,
        tune_verbatim=False,  # the file's tuned verbatim tensors (rep.tuned) stay as they are
        predictor=dataclasses.replace(cfg.predictor, quantise_bits=None),  # float unless asked (qat_bits)
        loss=dataclasses.replace(cfg.loss, warmup=0),
        optim=dataclasses.replace(cfg.optim, lr=lr, warmup_iterations=0, min_lr=min(cfg.optim.min_lr, lr)),
    )


def finetune_predictor(predictor: Predictor, masks: dict[str, torch.Tensor], cfg: FitConfig, model: nn.Module,
                       rep: Representation, splits: Any, iterations: int, lr: float, data_free: bool,
                       out_dir: Path, progress: bool = False,
                       qat_bits: int | None = None) -> tuple[Predictor, dict[str, torch.Tensor]]:
    """Fine-tune with `nern.fit.Fitter`, keeping pruned weights at exactly zero and, with `qat_bits`, training
    through the quantiser (`nern.qat`); returns a fresh predictor and the learnt steps ({} without QAT)."""
    ft_cfg = finetune_config(cfg, iterations, lr, data_free)
    setup = prepare(ft_cfg, model=model, permutation=rep.positions, splits=splits)
    setup.rep.scales = rep.scales  # the file's scales, not a recomputation
    setup.rep.tuned = rep.tuned  # and its tuned verbatim tensors, if the fit trained them
    fitter = Fitter(ft_cfg, setup, out_dir)
    fitter.predictor.load_state_dict(predictor.state_dict())
    if qat_bits:
        attach_quantisers(fitter.predictor, qat_bits)
        fitter.rebuild_optimizer()  # the steps are parameters too
    params = masked_parameters(fitter.predictor, masks)
    device_masks = {name: m.to(fitter.device, params[name].dtype) for name, m in masks.items()}
    hooks = [params[name].register_hook(lambda g, m=m: g * m) for name, m in device_masks.items()]
    mask_parameters(params, device_masks)
    mode = ("quantisation-aware " if qat_bits else "") + ("data-free" if data_free else "data")
    for _ in tqdm(range(iterations), desc=f"fine-tune ({mode})", disable=not progress, leave=False):
        fitter.step()
        mask_parameters(params, device_masks)  # the optimiser's weight decay / lookahead must not revive them
    for hook in hooks:
        hook.remove()
    fitter.close()
    steps = learnt_steps(fitter.predictor)
    detach_quantisers(fitter.predictor)  # weights = the integers times the steps: what the file stores
    tuned = copy.deepcopy(predictor).cpu()
    tuned.load_state_dict({k: v.detach().cpu() for k, v in fitter.predictor.state_dict().items()})
    return tuned.eval(), steps


def finetune_pruned(predictor: Predictor, masks: dict[str, torch.Tensor], cfg: FitConfig, model: nn.Module,
                    rep: Representation, splits: Any, iterations: int, lr: float, data_free: bool,
                    out_dir: Path, progress: bool = False) -> Predictor:
    """`finetune_predictor` without quantisation: the pruned predictor fine-tuned."""
    return finetune_predictor(predictor, masks, cfg, model, rep, splits, iterations, lr, data_free, out_dir,
                              progress)[0]


# ---------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class CompressOptions:
    sparsities: list[float]
    scopes: list[str]
    finetunes: list[str]
    precisions: list[str]
    finetune_iterations: int | None = None  # None: 5% of the fit's iterations, within [10, 2000]
    finetune_lr: float | None = None  # None: a fifth of the fit's peak learning rate
    compressor: str = "zstd"
    keep_files: bool = True
    vectors: str = "fp32"  # 1-D tensors (biases, BatchNorm) of every integer-coded file: fp32, fp16 or int8
    qat_bits: list[int] = dataclasses.field(default_factory=list)  # quantisation-aware fine-tunes, one per width
    qat_iterations: int | None = None  # None: the fit's distillation iterations, within [50, 2000]
    nncodec_qps: list[int] = dataclasses.field(default_factory=list)  # NNCodec on the original and the predictor
    batchnorm: str = "keep"  # fold: every BatchNorm stored as its affine map (NeRN and original files alike)
    verbatim_min: str | None = None  # NeRN files' verbatim matrices (FC, unrepresented convs) at least this fine
    # the original network trained through N-bit quantisers at the fit's budget (nern.original_qat), one per width
    qat_original_bits: list[int] = dataclasses.field(default_factory=list)
    qat_original_sparsities: list[float] = dataclasses.field(default_factory=lambda: [0.0])
    qat_original_fc: bool = False  # its FC through the quantiser too (else trained per tune_verbatim, stored int8)
    qat_original_scale: float = 1.0  # its iterations as a multiple of the fit's distillation iterations


VECTOR_PRECISIONS = ("fp32", "fp16", "int8")
BATCHNORM_MODES = ("keep", "fold")


def check_options(opts: CompressOptions) -> None:
    for s in opts.sparsities:
        if not 0.0 <= s < 1.0:
            raise NernError(f"sparsity {s} is outside [0, 1); pass fractions such as --sparsities 0,0.5,0.7,0.9")
    for name, values, allowed in (("scope", opts.scopes, SCOPES), ("fine-tune", opts.finetunes, FINETUNES),
                                  ("precision", opts.precisions, PRECISIONS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise NernError(f"{name} {bad[0] if bad else '(none)'!r} is not allowed; choose from {', '.join(allowed)}")
    if opts.compressor not in COMPRESSORS:
        raise NernError(f"unknown compressor {opts.compressor!r}; choose one of {', '.join(COMPRESSORS)}")
    if opts.vectors not in VECTOR_PRECISIONS:
        raise NernError(f"--vectors {opts.vectors!r} is not allowed; choose from {', '.join(VECTOR_PRECISIONS)}")
    if opts.verbatim_min is not None and opts.verbatim_min not in PRECISIONS:
        raise NernError(f"--verbatim-min {opts.verbatim_min!r} is not allowed; choose from {', '.join(PRECISIONS)}")
    if opts.batchnorm not in BATCHNORM_MODES:
        raise NernError(f"--batchnorm {opts.batchnorm!r} is not allowed; choose from {', '.join(BATCHNORM_MODES)}")
    bad_bits = [b for b in opts.qat_bits if not MIN_BITS <= b <= MAX_BITS]
    if bad_bits:
        raise NernError(f"--qat-bits {bad_bits[0]} is outside [{MIN_BITS}, {MAX_BITS}]; pass widths such as 4,3")
    if opts.qat_iterations is not None and opts.qat_iterations < 1:
        raise NernError(f"--qat-iterations {opts.qat_iterations} must be at least 1")
    check_original_qat_options(opts)
    bad_qps = [q for q in opts.nncodec_qps if not -80 <= q <= 0]
    if bad_qps:
        raise NernError(f"--nncodec-qps {bad_qps[0]} is outside [-80, 0] (lower is finer); pass e.g. -38,-26,-16")
    if opts.nncodec_qps and not nnc_available():
        raise NernError("--nncodec-qps needs NNCodec, which is not installed: run `bash setup.sh` (it installs "
                        "nncodec==2.1.3 with --no-deps) or leave --nncodec-qps empty")


def check_original_qat_options(opts: CompressOptions) -> None:
    bad_bits = [b for b in opts.qat_original_bits if not MIN_BITS <= b <= MAX_BITS]
    if bad_bits:
        raise NernError(f"--qat-original-bits {bad_bits[0]} is outside [{MIN_BITS}, {MAX_BITS}]; pass e.g. 2,3,4")
    bad = [s for s in opts.qat_original_sparsities if not 0.0 <= s < 1.0]
    if bad or not opts.qat_original_sparsities:
        raise NernError(f"--qat-original-sparsities {bad[0] if bad else '(none)'} is outside [0, 1); pass e.g. 0,0.5")
    if not opts.qat_original_scale > 0:
        raise NernError(f"--qat-original-scale {opts.qat_original_scale} must be positive; pass e.g. 1")


@dataclass
class Bench:
    """Where and how every variant is measured: its file is written, read back and evaluated."""

    files: Path
    opts: CompressOptions
    splits: Any
    cfg: FitConfig
    originals: list[torch.Tensor]
    layers: list[ConvLayer]
    bar: Any
    original: Predictions  # the original network's on the test set: each file is measured against it

    def measure(self, enc: Encoded, row: dict[str, Any]) -> dict[str, Any]:
        """Write the file, read it back into a fresh network, measure accuracy there."""
        path = self.files / f"{_label(row)}{FILE_SUFFIX}"
        sizes = write_container(path, enc, self.opts.compressor)
        return self._score(read_network(path), row, {"file": path.name, **sizes}, [path])

    def measure_nnc(self, tensors: dict[str, torch.Tensor], row: dict[str, Any], enc: Encoded | None = None,
                    skeleton: nn.Module | None = None) -> dict[str, Any]:
        """`tensors` through NNCodec at the row's qp; a NeRN's other parts (`enc`) in a container beside it. The
        bytes are both files'; the network is rebuilt from both read back."""
        nnc_path = self.files / f"{_label(row)}{NNC_SUFFIX}"
        nnc_bytes = write_nnc(nnc_path, float_tensors(tensors), row["qp"])
        if enc is None:
            sizes = {"file": nnc_path.name, "bytes": nnc_bytes, "nnc_bytes": nnc_bytes}
            return self._score(read_nnc_network(nnc_path, skeleton), row, sizes, [nnc_path])
        path = self.files / f"{_label(row)}{FILE_SUFFIX}"
        sizes = write_container(path, enc, self.opts.compressor)
        sizes = {**sizes, "file": f"{path.name}+{nnc_path.name}", "container_bytes": sizes["bytes"],
                 "nnc_bytes": nnc_bytes, "bytes": sizes["bytes"] + nnc_bytes}
        return self._score(read_network(path, nnc_path=nnc_path), row, sizes, [path, nnc_path])

    def _score(self, network: nn.Module, row: dict[str, Any], sizes: dict[str, Any],
               paths: list[Path]) -> dict[str, Any]:
        rebuilt = conv_weights(network, self.layers)
        rmse = reconstruction_loss([w.float() for w in rebuilt], [o.float() for o in self.originals])
        fidelity = split_fidelity(self.original, network.to(self.cfg.device).eval(), self.splits.test,
                                  self.cfg.data.eval_batch_size, self.cfg.device)
        row = {**row, **sizes, **fidelity, "rec_rmse": float(rmse)}
        if not self.opts.keep_files:
            for path in paths:
                path.unlink()
        self.bar.update(1)
        return row


def fit_iterations(cfg: FitConfig, splits: Any) -> int:
    """The fit's distillation iterations (its `iterations`, or its epochs in batches)."""
    if cfg.iterations is not None:
        return cfg.iterations
    return math.ceil((cfg.epochs or 1) * max(1, len(splits.train) // cfg.data.batch_size))


def default_finetune_iterations(cfg: FitConfig, splits: Any) -> int:
    return int(min(2000, max(10, round(0.05 * fit_iterations(cfg, splits)))))


def test_predictions(network: nn.Module, splits: Any, cfg: FitConfig) -> Predictions:
    return split_predictions(network.to(cfg.device).eval(), splits.test, cfg.data.eval_batch_size, cfg.device)


def _label(row: dict[str, Any]) -> str:
    scope = f"-{row['scope']}" if row["sparsity"] else ""
    ft = f"-ft-{row['finetune']}" if row["finetune"] != "none" else ""
    return f"{row['representation']}-s{row['sparsity']:g}{scope}{ft}-{row['precision']}"


def nern_variants(opts: CompressOptions) -> list[tuple[float, str, str]]:
    """(sparsity, scope, fine-tune) of every predictor to write; sparsity 0 needs neither scope nor fine-tune."""
    variants = []
    for s in sorted(set(opts.sparsities)):
        if s == 0:
            variants.append((0.0, "-", "none"))
            continue
        variants += [(s, scope, ft) for scope in opts.scopes for ft in opts.finetunes]
    return variants


def baseline_variants(opts: CompressOptions) -> list[tuple[float, str]]:
    variants = []
    for s in sorted(set(opts.sparsities)):
        variants += [(0.0, "-")] if s == 0 else [(s, scope) for scope in opts.scopes]
    return variants


def default_qat_iterations(cfg: FitConfig, splits: Any) -> int:
    """As long as the fit's distillation phase, within [50, 2000]: the quantiser steps must settle."""
    return int(min(2000, max(50, fit_iterations(cfg, splits))))


def qat_variants(opts: CompressOptions) -> list[tuple[float, str, int]]:
    """(sparsity, scope, bits) of every quantisation-aware fine-tune."""
    points = dict.fromkeys((s, scope) for s, scope, _ in nern_variants(opts))  # ordered, without fine-tune kinds
    return [(s, scope, bits) for s, scope in points for bits in opts.qat_bits]


def original_qat_variants(opts: CompressOptions) -> list[tuple[float, str, int]]:
    """(sparsity, scope, bits) of every quantisation-aware training of the original network."""
    points = []
    for s in sorted(set(opts.qat_original_sparsities)):
        points += [(0.0, "-")] if s == 0 else [(s, scope) for scope in opts.scopes]
    return [(s, scope, bits) for s, scope in points for bits in opts.qat_original_bits]


def count_files(opts: CompressOptions) -> int:
    plain = (len(nern_variants(opts)) + len(baseline_variants(opts))) * len(opts.precisions)
    return plain + len(qat_variants(opts)) + 2 * len(opts.nncodec_qps) + len(original_qat_variants(opts))


def run_compress(model: nn.Module, predictor: Predictor, rep: Representation, cfg: FitConfig, splits: Any,
                 out: str | Path, opts: CompressOptions, fitted_steps: dict[str, torch.Tensor] | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every NeRN variant and baseline as a file, measured from the file read back; writes the table and figure.
    A predictor fitted quantised (cfg.predictor.quantise_bits, its learnt `fitted_steps`) is also measured at its
    own width, stored as exactly the fit's integers."""
    check_options(opts)
    opts = with_fitted_width(opts, cfg.predictor.quantise_bits, fitted_steps)
    out = Path(out)
    start = time.perf_counter()
    originals = conv_weights(model, rep.layers)
    iterations = opts.finetune_iterations or default_finetune_iterations(cfg, splits)
    qat_iterations = opts.qat_iterations or default_qat_iterations(cfg, splits)
    lr = opts.finetune_lr or cfg.optim.lr / 5
    original = test_predictions(model, splits, cfg)
    original_top1 = original.top1()
    bar = tqdm(total=count_files(opts), desc="compress", disable=not cfg.progress, dynamic_ncols=True)
    bench = Bench(out / "files", opts, splits, cfg, originals, rep.layers, bar, original)
    schedule = FineTunes(iterations, qat_iterations, lr, out)
    rows = (nern_rows(bench, model, predictor, rep, schedule, fitted_steps or {}) + qat_rows(bench, model, predictor, rep, schedule)
            + nern_nnc_rows(bench, model, predictor, rep) + baseline_rows(bench, model)
            + original_qat_rows(bench, model, rep) + nnc_baseline_rows(bench, model))
    bar.close()
    add_comparisons(rows, original_top1, opts)
    metrics = summary_metrics(rows, original_top1, opts, iterations, lr, time.perf_counter() - start)
    metrics["qat_iterations"] = qat_iterations if opts.qat_bits else 0
    write_outputs(out, rows, metrics, cfg)
    return rows, metrics


@dataclass
class FineTunes:
    """How long and how fast every fine-tune of the stage runs, and where its scratch state goes."""

    iterations: int
    qat_iterations: int
    lr: float
    out: Path


def _row(representation: str, sparsity: float, scope: str, finetune: str, precision: str,
         masks: dict[str, torch.Tensor], iterations: int, **extra: Any) -> dict[str, Any]:
    return {"representation": representation, "sparsity": sparsity, "scope": scope, "finetune": finetune,
            "precision": precision, "achieved_sparsity": mask_sparsity(masks) if masks else 0.0,
            "finetune_iterations": iterations, **extra}


def with_fitted_width(opts: CompressOptions, bits: int | None, steps: dict[str, torch.Tensor] | None
                      ) -> CompressOptions:
    """The options with the fit's own width among the precisions (a quantised fit's natural file)."""
    if not bits:
        return opts
    if not steps:
        raise NernError(f"the predictor was fitted at predictor.quantise_bits={bits} but its file holds no learnt "
                        "steps (steps.*); refit it with this version of `nern fit`")
    width = f"int{bits}"
    return opts if width in opts.precisions else dataclasses.replace(opts, precisions=[*opts.precisions, width])


def finer(precision: str, floor: str | None) -> str:
    """The finer of two precisions (PRECISIONS runs from fine to coarse); no floor: `precision`. Why a floor: the
    FC rounded like a ternary predictor cost ResNet20's int2 file 14.9 pt for 808 bytes saved (cifar10-codec-lowbit)."""
    return precision if floor is None else min(precision, floor, key=PRECISIONS.index)


def nern_rows(bench: Bench, model: nn.Module, predictor: Predictor, rep: Representation,
              schedule: FineTunes, fitted_steps: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The predictor pruned, fine-tuned and quantised as each variant asks, each written as a NeRN file; at a
    quantised fit's own width the weights are rounded to the fit's learnt steps (exact where not fine-tuned)."""
    cfg, opts, rows = bench.cfg, bench.opts, []
    fitted_width = f"int{cfg.predictor.quantise_bits}" if cfg.predictor.quantise_bits else None
    for sparsity, scope, ft in nern_variants(opts):
        pruned, masks = pruned_predictor(predictor, sparsity, scope if sparsity else "global")
        if ft != "none":
            pruned = finetune_pruned(pruned, masks, cfg, model, rep, bench.splits, schedule.iterations, schedule.lr,
                                     ft == "data-free", schedule.out, cfg.progress)
        for precision in opts.precisions:
            base = _row("nern", sparsity, scope, ft, precision, masks, schedule.iterations if ft != "none" else 0)
            steps = fitted_steps if precision == fitted_width else None
            enc = encode_nern(pruned, masks, precision, rep, cfg.embedding, model, steps=steps, vectors=opts.vectors,
                              verbatim_precision=finer(precision, opts.verbatim_min), fold=opts.batchnorm == "fold")
            rows.append(bench.measure(enc, base))
    return rows


def qat_rows(bench: Bench, model: nn.Module, predictor: Predictor, rep: Representation,
             schedule: FineTunes) -> list[dict[str, Any]]:
    """The predictor (pruned first where asked) fine-tuned through an N-bit quantiser with learnt steps, stored as
    exactly those integers; the verbatim tensors at int8 (their 1-D ones at `vectors`)."""
    cfg, opts, rows = bench.cfg, bench.opts, []
    for sparsity, scope, bits in qat_variants(opts):
        pruned, masks = pruned_predictor(predictor, sparsity, scope if sparsity else "global")
        tuned, steps = finetune_predictor(pruned, masks, cfg, model, rep, bench.splits, schedule.qat_iterations,
                                          schedule.lr, False, schedule.out, cfg.progress, qat_bits=bits)
        enc = encode_nern(tuned, masks, f"int{bits}", rep, cfg.embedding, model, steps=steps,
                          verbatim_precision="int8", vectors=opts.vectors, fold=opts.batchnorm == "fold")
        rows.append(bench.measure(enc, _row("nern", sparsity, scope, "qat", f"int{bits}", masks,
                                            schedule.qat_iterations)))
    return rows


def nern_nnc_rows(bench: Bench, model: nn.Module, predictor: Predictor, rep: Representation) -> list[dict[str, Any]]:
    """The fitted predictor and the verbatim tensors through NNCodec; permutations and scales in a container."""
    rows = []
    tensors = {**{f"predictor.{k}": v for k, v in predictor.state_dict().items()},
               **{f"verbatim.{k}": v for k, v in verbatim_state(model, rep).items()}}
    enc = encode_nern(predictor, {}, "fp32", rep, bench.cfg.embedding, model, parts=())
    for qp in bench.opts.nncodec_qps:
        rows.append(bench.measure_nnc(tensors, _row("nern+nnc", 0.0, "-", "none", f"nnc{qp}", {}, 0, qp=qp), enc))
    return rows


def nnc_baseline_rows(bench: Bench, model: nn.Module) -> list[dict[str, Any]]:
    """The original network through NNCodec at each qp: the codec a user would pick instead."""
    state = copy.deepcopy(model).cpu().state_dict()
    return [bench.measure_nnc(state, _row("original", 0.0, "-", "none", f"nnc{qp}", {}, 0, qp=qp),
                              skeleton=fresh_skeleton(model)) for qp in bench.opts.nncodec_qps]


def baseline_rows(bench: Bench, model: nn.Module) -> list[dict[str, Any]]:
    """The original network magnitude-pruned and quantised the same ways, each written as a network file."""
    cpu_model, rows = copy.deepcopy(model).cpu(), []
    for sparsity, scope in baseline_variants(bench.opts):
        weights = prunable_network_weights(cpu_model)
        masks = magnitude_masks(weights, sparsity, scope) if sparsity else {}
        for precision in bench.opts.precisions:
            pruned = copy.deepcopy(cpu_model)
            apply_masks(pruned, masks)
            enc = encode_network(pruned, masks, precision, bench.opts.vectors, bench.opts.batchnorm == "fold")
            rows.append(bench.measure(enc, _row("original", sparsity, scope, "none", precision, masks, 0)))
    return rows


def original_qat_rows(bench: Bench, model: nn.Module, rep: Representation) -> list[dict[str, Any]]:
    """The original network (magnitude-pruned first where asked) trained through N-bit learnt-step quantisers
    with the NeRN fit's data, losses, optimiser and iterations (`nern.original_qat`), stored as exactly the trained
    integers; its other matrices at int8 (1-D tensors at `vectors`), like a quantisation-aware NeRN file's
    verbatim ones. Finetune `qat` tells these trained rows from the untrained original rows (`none`)."""
    cfg, opts, rows = bench.cfg, bench.opts, []
    cpu_model = copy.deepcopy(model).cpu()
    for sparsity, scope, bits in original_qat_variants(opts):
        masks = magnitude_masks(prunable_network_weights(cpu_model), sparsity, scope) if sparsity else {}
        trained = train_original(cfg, cpu_model, rep.layers, bench.splits, bits, masks, opts.qat_original_fc,
                                 opts.qat_original_scale, cfg.progress)
        enc = encode_network(trained.network, masks, f"int{bits}", opts.vectors, opts.batchnorm == "fold",
                             steps=trained.steps, precisions=unquantised_precisions(trained))
        row = _row("original", sparsity, scope, "qat", f"int{bits}", masks, trained.budget.iterations,
                   quantised=",".join(trained.quantised), **trained.budget.row())
        rows.append(bench.measure(enc, row))
    return rows


def add_comparisons(rows: list[dict[str, Any]], original_top1: float, opts: CompressOptions) -> None:
    """Each row's label, its size against the unpruned fp32 original, and its accuracy change."""
    fp32 = next(r["bytes"] for r in rows if r["representation"] == "original" and r["sparsity"] == 0
                and r["precision"] == "fp32") if 0.0 in opts.sparsities and "fp32" in opts.precisions else None
    for row in rows:
        row["label"] = _label(row)
        row["ratio_vs_original_fp32"] = row["bytes"] / fp32 if fp32 else None
        row["delta_top1"] = row["top1"] - original_top1


def summary_metrics(rows: list[dict[str, Any]], original_top1: float, opts: CompressOptions, iterations: int,
                    lr: float, seconds: float) -> dict[str, Any]:
    """Scalars for metrics.json and MLflow: each unpruned file's bytes and accuracy, per representation."""
    metrics: dict[str, Any] = {"original_top1": original_top1, "compressor": opts.compressor,
                               "finetune_iterations": iterations, "finetune_lr": lr, "variants": len(rows),
                               "wall_seconds": seconds}
    for row in rows:
        if row["sparsity"] == 0:
            tuned = f"_{row['finetune']}" if row["finetune"] != "none" else ""
            key = f"{row['representation']}{tuned}_{row['precision']}"
            metrics[f"{key}_bytes"] = row["bytes"]
            metrics[f"{key}_top1"] = row["top1"]
    representations = dict.fromkeys(r["representation"] for r in rows)
    metrics["frontier"] = {rep: frontier([r for r in rows if r["representation"] == rep])
                           for rep in representations}
    metrics["frontier"]["all"] = frontier(rows)
    return metrics


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats in both bytes and accuracy, smallest first (label, bytes and top-1 of each)."""
    front = pareto_front([(row["bytes"], row["top1"]) for row in rows])
    return [{"label": rows[i]["label"], "bytes": rows[i]["bytes"], "top1": rows[i]["top1"]} for i in front]


# ---------------------------------------------------------------------------------------------------------
# Table and figure

TABLE_COLUMNS = {"representation": "representation", "sparsity": "sparsity", "scope": "scope",
                 "finetune": "fine-tune", "precision": "precision", "bytes": "bytes on disk",
                 "ratio_vs_original_fp32": "ratio vs original fp32", "top1": "top-1", "delta_top1": "Δ top-1",
                 "agreement": "agreement", "kl_to_original": "KL to original",
                 "predictor_bytes": "predictor bytes", "verbatim_bytes": "verbatim bytes",
                 "permutation_bytes": "permutation bytes", "weights_bytes": "weights bytes",
                 "nnc_bytes": "NNCodec bytes"}
CSV_FILE, MD_FILE, FIGURE_FILE = "compression.csv", "compression.md", "accuracy_vs_bytes.png"
METRICS_FILE = "metrics.json"


def write_outputs(out: Path, rows: list[dict[str, Any]], metrics: dict[str, Any], cfg: FitConfig) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    front = ["label", "representation", "sparsity", "scope", "finetune", "precision", "bytes", "top1"]
    df = df[front + [c for c in df.columns if c not in front]]
    with atomic_path(out / CSV_FILE) as tmp:
        df.to_csv(tmp, index=False)
    shown = df[[c for c in TABLE_COLUMNS if c in df.columns]].rename(columns=TABLE_COLUMNS)
    caption = (f"**Meta-compression: bytes on disk ({metrics['compressor']} on top of every file) and test top-1 "
               f"measured on the network rebuilt from the file read back. Original network: "
               f"{metrics['original_top1']:.2f}%. Fine-tunes: {metrics['finetune_iterations']} iterations.**\n\n")
    with atomic_path(out / MD_FILE) as tmp:
        tmp.write_text(caption + to_markdown(shown))
    plot_accuracy_vs_bytes(rows, metrics["original_top1"], out / FIGURE_FILE, metrics["compressor"])
    write_json(out / METRICS_FILE, metrics)  # last: its presence means the stage finished


FAMILY_STYLE = {("nern", "none"): ("tab:blue", "NeRN"), ("nern", "data"): ("tab:green", "NeRN + fine-tune"),
                ("nern", "data-free"): ("tab:olive", "NeRN + data-free fine-tune"),
                ("nern", "qat"): ("tab:purple", "NeRN, quantisation-aware"),
                ("nern+nnc", "none"): ("tab:cyan", "NeRN, predictor via NNCodec"),
                ("original", "none"): ("tab:red", "original network, no retraining"),
                ("original", "qat"): ("tab:brown", "original network, quantisation-aware (fit's budget)")}
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "int6": "D", "int5": "d", "int4": "v", "int3": "<",
                     "int2": ">", "nnc": "*"}


def marker_key(precision: str) -> str:
    """The PRECISION_MARKERS key of a row's precision (every NNCodec qp shares one marker)."""
    return "nnc" if precision.startswith("nnc") else precision


def plot_accuracy_vs_bytes(rows: list[dict[str, Any]], original_top1: float, path: Path, compressor: str) -> None:
    """All variants as points (colour: family, marker: precision), each family's Pareto front as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (rep, ft), (colour, name) in FAMILY_STYLE.items():
        family = [r for r in rows if r["representation"] == rep and r["finetune"] == ft]
        if not family:
            continue
        for precision, marker in PRECISION_MARKERS.items():
            pts = [r for r in family if marker_key(r["precision"]) == precision]
            if pts:
                ax.scatter([r["bytes"] for r in pts], [r["top1"] for r in pts], c=colour, marker=marker, s=28,
                           alpha=0.75, edgecolors="none")
        front = frontier(family)
        ax.plot([r["bytes"] for r in front], [r["top1"] for r in front], color=colour, label=name, lw=1.2)
    overall = frontier(rows)
    ax.plot([r["bytes"] for r in overall], [r["top1"] for r in overall], color="black", lw=2.5, alpha=0.25,
            label="Pareto front (all files)")
    for precision, marker in PRECISION_MARKERS.items():
        if any(marker_key(r["precision"]) == precision for r in rows):
            ax.scatter([], [], c="grey", marker=marker, label="NNCodec qp" if precision == "nnc" else precision)
    ax.axhline(original_top1, color="black", ls=":", lw=1, label=f"original {original_top1:.2f}%")
    ax.set_xscale("log")
    ax.set_xlabel(f"bytes on disk (whole file, {compressor})")
    ax.set_ylabel("test top-1 (%) of the network read back")
    ax.set_title("Accuracy vs bytes on disk: NeRN variants and codecs on the original")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------------------
# CLI


def comma_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise NernError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. 4,3") from None


def cmd_compress(args: argparse.Namespace) -> None:
    opts = CompressOptions(comma_floats(args.sparsities, "--sparsities"), comma_names(args.scopes),
                           comma_names(args.finetune), comma_names(args.precisions), args.finetune_iterations,
                           args.finetune_lr, args.compressor, args.keep_files == "all", args.vectors,
                           comma_ints(args.qat_bits, "--qat-bits"), args.qat_iterations,
                           comma_ints(args.nncodec_qps, "--nncodec-qps"), args.batchnorm, args.verbatim_min,
                           comma_ints(args.qat_original_bits, "--qat-original-bits"),
                           comma_floats(args.qat_original_sparsities, "--qat-original-sparsities"),
                           args.qat_original_fc == "qat", args.qat_original_scale)
    check_options(opts)
    cfg, model, predictor, rep, splits = load_fitted(args)
    out = Path(args.out)
    options = {f"compress.{k}": v for k, v in dataclasses.asdict(opts).items()}
    params = {**flatten(to_dict(cfg)), **options, "predictor_file": args.predictor}
    with stage_run(args, "compress", params, NON_RESULT_KEYS, data=cfg.data) as tracker:
        rows, metrics = run_compress(model, predictor, rep, cfg, splits, out, opts, fitted_steps(args.predictor))
        log_outputs(tracker, out, {k: v for k, v in metrics.items() if k != "frontier"},
                     [CSV_FILE, MD_FILE, FIGURE_FILE, METRICS_FILE])
    nern_best = metrics.get("nern_int8_bytes"), metrics.get("nern_int8_top1")
    print(f"[compress] {len(rows)} files measured; original {metrics['original_top1']:.2f}%"
          + (f", NeRN int8 {nern_best[0]:,} B at {nern_best[1]:.2f}%" if nern_best[0] else "") + f" -> {out}")


def register_cli(subparsers: Any, name: str) -> None:
    p = subparsers.add_parser(name, help="prune/quantise a fitted NeRN into real files; accuracy vs bytes on disk")
    add_stage_arguments(p, f"output directory ({CSV_FILE}, {MD_FILE}, {FIGURE_FILE}, {METRICS_FILE}, files/)")
    p.add_argument("--model", required=True, help="the original network's checkpoint the predictor was fitted to")
    p.add_argument("--predictor", required=True, help="predictor.safetensors from `nern fit`")
    p.add_argument("--sparsities", default="0,0.5,0.7,0.9", help="pruning fractions of the predictor's (and, for "
                   "the baseline, the original's) weights, comma-separated")
    p.add_argument("--scopes", default="global", help="magnitude-pruning scopes: global and/or layer (per-layer)")
    p.add_argument("--finetune", default="none,data,data-free",
                   help="after pruning: none, data (task images) and/or data-free (noise) fine-tunes")
    p.add_argument("--finetune-iterations", type=int, help="fine-tune length (default: 5%% of the fit's, 10..2000)")
    p.add_argument("--finetune-lr", type=float, help="fine-tune peak learning rate (default: the fit's / 5)")
    p.add_argument("--precisions", default="fp32,fp16,int8,int4", help=f"from {', '.join(PRECISIONS)}")
    p.add_argument("--compressor", default="zstd", choices=list(COMPRESSORS), help="lossless codec on every file")
    p.add_argument("--vectors", default="fp32", choices=list(VECTOR_PRECISIONS),
                   help="1-D tensors (biases, BatchNorm) of integer-coded files, NeRN and original alike; int8: one "
                   "scale per tensor")
    p.add_argument("--qat-bits", default="", help="quantisation-aware fine-tunes of the predictor (learnt steps), "
                   f"one per width in [{MIN_BITS}, {MAX_BITS}], comma-separated, e.g. 4,3 (default: none)")
    p.add_argument("--qat-iterations", type=int, help="quantisation-aware fine-tune length (default: the fit's "
                   "distillation iterations, 50..2000)")
    p.add_argument("--nncodec-qps", default="", help="NNCodec quantisation parameters for the original network and "
                   "the predictor, comma-separated, e.g. -38,-32,-26,-20,-16,-12 (lower: finer; default: none)")
    p.add_argument("--batchnorm", default="keep", choices=list(BATCHNORM_MODES),
                   help="fold: store every BatchNorm as its eval-mode affine map (scale, shift), NeRN and original "
                   "files alike: half the BatchNorm bytes, the same function")
    p.add_argument("--verbatim-min", choices=list(PRECISIONS),
                   help="NeRN files keep their verbatim matrices (FC, unrepresented convs) at least this fine, e.g. "
                   "int8 (default: the file's own precision)")
    p.add_argument("--qat-original-bits", default="", help="the equal-budget baseline: the ORIGINAL network's "
                   "represented convs trained through learnt-step quantisers with the fit's data, losses, optimiser "
                   f"and distillation iterations, one per width in [{MIN_BITS}, {MAX_BITS}], e.g. 2,3,4 "
                   "(default: none)")
    p.add_argument("--qat-original-sparsities", default="0", help="magnitude-pruning fractions of the original "
                   "before its quantisation-aware training (scopes from --scopes), e.g. 0,0.5")
    p.add_argument("--qat-original-fc", default="int8", choices=["int8", "qat"], help="the original's FC in the "
                   "baseline: int8 (stored at int8, trained only if the fit tuned its verbatim tensors) or qat "
                   "(trained through the same quantisers, stored at the width)")
    p.add_argument("--qat-original-scale", type=float, default=1.0, help="the baseline's iterations as a multiple "
                   "of the fit's distillation iterations (default 1: the same budget)")
    p.add_argument("--keep-files", default="all", choices=["all", "none"],
                   help="keep the measured files under OUT/files (none: delete each after measuring)")
    p.set_defaults(func=cmd_compress)
