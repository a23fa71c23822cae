"""The Snakemake pipeline itself: every preset's DAG, the tiny preset end to end (local and on Slurm).

Snakemake runs as `<this interpreter> -m snakemake`, so its jobs (also inside Slurm) call the CLI with the
interpreter that has `nern` installed. Every run is wrapped in `timeout -s INT`: a waiting Snakemake ignores
SIGTERM.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

import faults

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"
TEST_CONFIG = REPO / "config" / "test.yaml"
TRACKED_RULES = ("import_weights", "pretrain", "fit", "fit_ablation", "fit_data_free", "compress", "importance")  # one MLflow run per job
STAGE_RULES = {"manifest", "permute", "fit", "tables", "all"}


def snakemake(args: list[str], cwd: Path, timeout_s: int) -> subprocess.CompletedProcess:
    command = ["timeout", "-s", "INT", "-k", "30", str(timeout_s), sys.executable, "-m", "snakemake", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def tail(done: subprocess.CompletedProcess, chars: int = 6000) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-chars:]}\n--- stderr\n{done.stderr[-chars:]}"


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def job_counts(text: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints: {rule: count}."""
    counts: dict[str, int] = {}
    lines = text.splitlines()
    for start, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[start + 3:]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                if parts[0] != "total":
                    counts[parts[0]] = int(parts[1])
            break
    return counts


def run_in(workdir: Path, configfile: Path, profile: str, timeout_s: int, *extra: str) -> subprocess.CompletedProcess:
    # targets first: options such as --default-resources take several values and would swallow them
    return snakemake(["all", "--snakefile", str(SNAKEFILE), "--directory", str(workdir), "--configfile",
                      str(configfile), "--profile", str(REPO / "workflow" / "profiles" / profile), *extra],
                     cwd=workdir, timeout_s=timeout_s)


def job_runs(workdir: Path, experiment: str) -> list:
    """Every job's MLflow run; the preset's one parent run (which only groups them) is checked and left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if "nern.parent" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", f"{len(parents)} parent runs"
    jobs = [r for r in runs if "nern.parent" not in r.data.tags]
    assert {r.data.tags.get("mlflow.parentRunId") for r in jobs} == {parents[0].info.run_id}, "a job outside the parent"
    return jobs


def finished_runs(workdir: Path, experiment: str) -> list:
    return [r for r in job_runs(workdir, experiment) if r.info.status == "FINISHED"]


def all_runs(workdir: Path, experiment: str) -> int:
    return len(job_runs(workdir, experiment))


def check_outputs(workdir: Path, preset: str, counts: dict[str, int]) -> None:
    """Every table has one row per manifest row of its group, with real accuracies; figures exist; MLflow
    holds one finished run per pretrain/import/fit job, tagged with its rule."""
    manifest = yaml.safe_load((workdir / "results" / preset / "manifest.yaml").read_text())
    groups = pd.Series([row["group"] for row in manifest["rows"]]).value_counts()
    tables = workdir / "results" / "tables" / preset
    for group, rows in groups.items():
        table = pd.read_csv(tables / f"{group}.csv")
        assert (tables / f"{group}.md").read_text().count("\n| ") >= 1
        assert (tables / f"{group}.tex").read_text().startswith(r"\begin{table}")
        expected = rows // 2 if group == "data_free" else rows  # data-free pairs two fits per row
        assert len(table) == expected, f"{group}: {len(table)} rows, manifest has {rows}"
        for column in [c for c in table.columns if "top-1" in c and not c.startswith(("Δ", "paper"))]:
            assert all(0.0 <= v <= 100.0 and math.isfinite(v) for v in table[column]), (group, column)
    for figure in (workdir / "results" / "figures" / preset).glob("*.png"):
        assert figure.read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "results" / "figures" / preset / "accuracy_vs_size.png").is_file()

    runs = finished_runs(workdir, preset)
    expected_runs = sum(counts.get(rule, 0) for rule in TRACKED_RULES)
    assert len(runs) == expected_runs, f"{len(runs)} finished MLflow runs, {expected_runs} tracked jobs"
    by_rule = pd.Series([r.data.tags.get("rule") for r in runs]).value_counts().to_dict()
    assert by_rule == {rule: counts[rule] for rule in TRACKED_RULES if counts.get(rule)}
    fit_run = next(r for r in runs if r.data.tags.get("rule") == "fit")
    assert {"network", "permutation", "hidden", "fit_preset", "original"} <= set(fit_run.data.tags)
    assert "reconstructed_top1" in fit_run.data.metrics and fit_run.data.params


# -- every preset's DAG --------------------------------------------------------------------------------------


PRESETS = ["config.yaml"] + sorted(f"config/{path.name}" for path in (REPO / "config").glob("*.yaml")
                                  if path.name != "published.yaml")
# An experiment file overrides the preset of its folder (experiments/README.md).
EXPERIMENT_BASES = {"codec": "config/cifar10-codec.yaml"}
EXPERIMENTS = [(EXPERIMENT_BASES[path.parent.name], str(path.relative_to(REPO)))
               for path in sorted((REPO / "experiments").glob("*/*.yaml"))]


def merged_networks(files: tuple[str, ...]) -> list[dict]:
    """The networks of config files merged as Snakemake merges them (a later list replaces an earlier one)."""
    networks: list[dict] = []
    for path in files:
        networks = yaml.safe_load((REPO / path).read_text()).get("networks", networks)
    return networks


def skip_without_weights(files: tuple[str, ...]) -> None:
    for network in merged_networks(files):
        weights = network["original"].get("checkpoint") or ""
        if weights and not weights.startswith("torchvision:") and not (REPO / weights).is_file():
            pytest.skip(f"{' '.join(files)} needs {weights}")


@pytest.mark.parametrize("files", [(preset,) for preset in PRESETS] + EXPERIMENTS, ids=" + ".join)
@pytest.mark.slow
def test_every_preset_and_experiment_builds_its_whole_dag_offline(files: tuple[str, ...]) -> None:
    skip_without_weights(files)
    done = snakemake(["-n", "--forceall", "--nolock", "--configfile", *files], cwd=REPO, timeout_s=300)
    assert done.returncode == 0, tail(done)
    counts = job_counts(output(done))
    print(f"{' + '.join(files)}: {counts}")
    assert STAGE_RULES - {"permute"} <= set(counts), counts
    assert {"permute", "permute_network"} & set(counts), counts  # a symmetry-only grid permutes the network alone
    assert counts["tables"] == counts["manifest"] == counts["all"] == 1
    if files == ("config/paper.yaml",):
        assert {"pretrain", "import_weights", "fit_ablation", "fit_data_free"} <= set(counts)
        assert counts["fit"] >= 4 * 3 * 3  # four networks x three permutations x at least three sizes


def dry_run_preset(*files: str) -> str:
    """The printed dry run (-n -p) of a preset (and the experiment files over it) whose networks import a checkpoint;
    skips when one is absent."""
    skip_without_weights(files)
    done = snakemake(["-n", "--forceall", "--nolock", "--configfile", *files, "--cores", "2", "-p"], cwd=REPO,
                     timeout_s=300)
    assert done.returncode == 0, tail(done)
    return output(done)


def fit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "nern fit" in line]


def test_the_codec_preset_fits_the_best_recipes_at_three_seeds_each() -> None:
    """config/cifar10-codec.yaml: on the symmetry-permuted network (rule permute_network writes it, the fits read
    it), int4 h=132 with fmd 0.1 label-free and with loss.ce 1, and int6 h=160, each at seeds 0, 1, 2; 1,500
    distillation iterations with BatchNorm/FC tuned; every fit compressed (NNCodec beside), no importance."""
    text = dry_run_preset("config/cifar10-codec.yaml")
    assert job_counts(text) == {"import_weights": 1, "permute_network": 1, "fit": 9, "compress": 9,
                                "manifest": 1, "tables": 1, "all": 1}
    fits = fit_lines(text)
    assert all("symmetry.model.safetensors --permutation" in f and "--set iterations=1500" in f
               and "--set tune_verbatim=true" in f for f in fits)

    def recipe(line: str) -> tuple:
        found = {key: re.search(rf"--set {re.escape(key)}=(\S+)", line) for key in
                 ("predictor.quantise_bits", "predictor.hidden", "loss.fmd", "loss.ce", "optim.step_lr_scale", "seed")}
        return tuple(match.group(1) if match else "-" for match in found.values())

    assert sorted(recipe(f) for f in fits) == sorted(
        [("4", "132", "0.1", "-", "10", seed) for seed in ("-", "1", "2")]
        + [("4", "132", "0.1", "1", "10", seed) for seed in ("-", "1", "2")]
        + [("6", "160", "-", "-", "-", seed) for seed in ("-", "1", "2")])  # "-": not set (seed: the default, 0)


def test_the_first_codec_sweep_fits_quantised_predictors_and_permutes_the_network_for_symmetry() -> None:
    """experiments/codec/cifar10-codec-first.yaml (issue #15): a float fit and four fits through 4- and 3-bit
    quantisers (one on the symmetry-permuted network), meta-compression with NNCodec on every fit, no importance."""
    text = dry_run_preset("config/cifar10-codec.yaml", "experiments/codec/cifar10-codec-first.yaml")
    assert job_counts(text) == {"import_weights": 1, "permute": 1, "permute_network": 1, "fit": 5,
                                "compress": 5, "manifest": 1, "tables": 1, "all": 1}
    assert "--mode symmetry" in text and "--model-out" in text
    assert "permutation/imported/symmetry.model.safetensors --permutation" in text  # the fit reads the permuted net
    assert "--nncodec-qps=-38,-32,-26,-20,-16,-12" in text and "--precisions=fp16,int8" in text
    assert "results/cifar10-codec-first/cifar10-resnet20/" in text
    fits = re.findall(r"nern fit .*?--out (\S+)", text)
    quantised = [line for line in fit_lines(text) if "predictor.quantise_bits" in line]
    assert len(fits) == 5 and len(quantised) == 4
    assert all("--set iterations=600" in line for line in quantised)
    assert not any("tune_verbatim" in line for line in fit_lines(text))  # the preset's network entry is replaced
    assert sum("predictor.quantise_bits=3" in line for line in quantised) == 1


def test_the_long_codec_sweep_fits_longer_and_tunes_the_verbatim_tensors() -> None:
    """experiments/codec/cifar10-codec-long.yaml: three quantised fits (int4 h160/h132, int6 h160) on the
    symmetry-permuted network, 1,500 distillation iterations each, BatchNorm/FC trained with them, then compressed."""
    text = dry_run_preset("config/cifar10-codec.yaml", "experiments/codec/cifar10-codec-long.yaml")
    assert job_counts(text) == {"import_weights": 1, "permute_network": 1, "fit": 3, "compress": 3,
                                "manifest": 1, "tables": 1, "all": 1}
    fits = fit_lines(text)
    assert len(fits) == 3 and all("--set iterations=1500" in f and "--set tune_verbatim=true" in f for f in fits)
    assert all("symmetry.model.safetensors --permutation" in f for f in fits)
    assert sorted(re.search(r"quantise_bits=(\d)", f).group(1) + re.search(r"hidden=(\d+)", f).group(1)
                  for f in fits) == ["4132", "4160", "6160"]


def test_the_targets_codec_sweep_sizes_one_fit_per_target() -> None:
    """experiments/codec/cifar10-codec-targets.yaml: int4 h134 and int5 h114 (the 50-KB files) for 3,000
    distillation iterations, int6 h160 (the 100-KB file) for 1,500, all on the symmetry-permuted network."""
    text = dry_run_preset("config/cifar10-codec.yaml", "experiments/codec/cifar10-codec-targets.yaml")
    assert job_counts(text) == {"import_weights": 1, "permute_network": 1, "fit": 3, "compress": 3,
                                "manifest": 1, "tables": 1, "all": 1}
    fits = fit_lines(text)
    assert all("--set tune_verbatim=true" in f and "symmetry.model.safetensors --permutation" in f for f in fits)
    found = sorted((re.search(r"quantise_bits=(\d)", f).group(1), re.search(r"hidden=(\d+)", f).group(1),
                    re.search(r"--set iterations=(\d+)", f).group(1)) for f in fits)
    assert found == [("4", "134", "3000"), ("5", "114", "3000"), ("6", "160", "1500")]


def test_the_cpu_cifar_preset_builds_the_issues_design() -> None:
    """config/cifar10-cpu.yaml (issues #14, #32): the headline points at seeds 0-2; in-domain originals (the public weights imported, then fine-tuned:
    ResNet20 with smoothness 0 and 5e-6, ResNet56 with 0); ResNet20 in three permutation modes at 160 and 180 with
    the loss and embedding ablations, one data-free fit and the regularisation row at 5e-6; ResNet56 crossfilter at
    280 and 320 plus none at 320 only; meta-compression and importance on the two reference fits. Needs ../shared,
    as the public preset does."""
    preset = "config/cifar10-cpu.yaml"
    config = yaml.safe_load((REPO / preset).read_text())
    for network in config["networks"]:
        if not (REPO / network["original"]["checkpoint"]).is_file():
            pytest.skip(f"{preset} needs {network['original']['checkpoint']}")
    done = snakemake(["-n", "--forceall", "--nolock", "--configfile", preset, "--cores", "2"], cwd=REPO,
                     timeout_s=300)
    assert done.returncode == 0, tail(done)
    assert job_counts(output(done)) == {"import_weights": 2, "pretrain": 3, "permute": 6, "fit": 14,
                                        "fit_ablation": 2, "fit_data_free": 1, "compress": 2, "importance": 2,
                                        "manifest": 1, "tables": 1, "all": 1}
    resnet56 = set(re.findall(r"cifar10-resnet56/fit/fast/reg0/(\w+/h[\w-]+)/metrics\.json", output(done)))
    assert resnet56 == {"crossfilter/h280", "crossfilter/h320", "none/h320", "crossfilter/h320-seed1",
                        "crossfilter/h320-seed2"}  # the headline points at seeds 0, 1, 2
    resnet20 = set(re.findall(r"cifar10-resnet20/fit/fast/reg0/crossfilter/(h180[\w-]*)/metrics", output(done)))
    assert resnet20 == {"h180", "h180-seed1", "h180-seed2"}


def test_a_config_typo_fails_before_any_job_naming_the_key(tmp_path: Path) -> None:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["networks"][0]["grid"]["hiden"] = [16]
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(["-n", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path), "--configfile",
                      str(tmp_path / "typo.yaml")], cwd=tmp_path, timeout_s=300)
    assert done.returncode != 0
    assert "hiden" in output(done)


def test_a_preset_with_the_old_fit_presets_key_fails_in_one_line_naming_fit_recipes(tmp_path: Path) -> None:
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["fit_presets"] = config.pop("fit_recipes")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(["-n", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path), "--configfile",
                      str(tmp_path / "old.yaml")], cwd=tmp_path, timeout_s=300)
    assert done.returncode != 0
    assert "fit_presets is now fit_recipes (fit recipes live in config/recipes/); rename the key\n" in output(done)
    assert "Job stats" not in output(done)


def test_a_typo_in_an_ablation_setting_fails_the_dry_run_naming_the_key(tmp_path: Path) -> None:
    """The schema cannot see inside `set:`; nern.grid validates every job's merged settings at DAG build."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config["networks"][0]["ablations"][0]["variants"][0]["set"] = {"loss.kdd": 0}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(["-n", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path), "--configfile",
                      str(tmp_path / "typo.yaml")], cwd=tmp_path, timeout_s=300)
    assert done.returncode != 0
    assert "networks[fmnist-resnet8].ablations[loss].variants[rec].set: unknown config key 'loss.kdd'" in output(done)
    assert "Job stats" not in output(done)  # no DAG was built


# -- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_preset_runs_end_to_end_locally(tmp_path: Path) -> None:
    start = time.monotonic()
    done = run_in(tmp_path, TEST_CONFIG, "local", 1500)
    wall = time.monotonic() - start
    assert done.returncode == 0, tail(done)
    counts = job_counts(output(done))
    print(f"local end-to-end run of config/test.yaml: {wall:.0f} s, jobs {counts}")
    check_outputs(tmp_path, "test", counts)

    # a rerun does nothing; a changed parameter reruns exactly the jobs it touches
    again = run_in(tmp_path, TEST_CONFIG, "local", 300, "-n")
    assert again.returncode == 0 and "Nothing to be done" in output(again), tail(again)
    config = yaml.safe_load(TEST_CONFIG.read_text())
    for group in config["networks"][0]["ablations"]:
        for variant in group["variants"]:
            if variant.get("set", {}).get("embedding.base"):
                variant["set"]["embedding.base"] = 1.5
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(config))
    changed = run_in(tmp_path, tmp_path / "changed.yaml", "local", 300, "-n")
    assert changed.returncode == 0, tail(changed)
    assert job_counts(output(changed)) == {"fit_ablation": 1, "manifest": 1, "tables": 1, "all": 1}

    report = snakemake(["--snakefile", str(SNAKEFILE), "--directory", str(tmp_path), "--configfile",
                        str(TEST_CONFIG), "--report", str(tmp_path / "report.html")], cwd=tmp_path, timeout_s=600)
    assert report.returncode == 0, tail(report)
    assert (tmp_path / "report.html").stat().st_size > 10_000
    check_report((tmp_path / "report.html").read_text(), tmp_path, "test")


# A user's own network, as a user writes it: plain PyTorch in a module of their own, nothing from nern.
USER_NET = """import torch
from torch import nn


class UserNet(nn.Module):
    # conv biases, max-pooling, no BatchNorm; it expects raw 0..255 pixels and scales them itself
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(2 * width * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x / 255).flatten(1))


def build(width: int = 8) -> UserNet:
    return UserNet(width)
"""
RAW_PIXELS = {"input_range": 255, "mean": [0], "std": [1]}  # explicit: the network gets the pixels as they are


def user_config(workdir: Path) -> Path:
    """A user's own preset, modelled on config/test.yaml: one imported network, a two-fit grid, both applications."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config.update(name="usernet", description="a user's CNN by reference",
                  compress={"sparsities": [0, 0.5], "finetune": ["none"], "precisions": ["fp32", "int8"]},
                  importance={"sparsities": [0.5], "methods": ["nern-error", "magnitude"]})
    network = config["networks"][0]
    for key in ("regularisation", "ablations", "data_free", "reference"):
        network.pop(key)
    network.update(name="fmnist-usernet", model={"factory": "user_net.py:build", "kwargs": {"width": 8},
                                                 "in_channels": 1, "num_classes": 10},
                   original={"source": "import", "checkpoint": "weights.pt"})
    network["data"].update(RAW_PIXELS)
    network["grid"] = {"fit_recipes": ["fast"], "permutations": ["none", "crossfilter"], "hidden": [16]}
    path = workdir / "usernet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def user_weights(workdir: Path, data: dict) -> tuple[float, float]:
    """A few Adam steps on raw pixels, saved as a plain state dict; the trained network's test top-1 on raw
    pixels and on the data set's standard normalisation (so a job that lost the data keys would show)."""
    import importlib.util

    import torch

    from nern import data as data_mod
    from nern.config import DataConfig
    from nern.evaluate import top_k_accuracy

    spec = importlib.util.spec_from_file_location("user_net", workdir / "user_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.build(width=8)
    raw = DataConfig(**{**data, "root": str(workdir / data["root"])})
    splits = data_mod.build_splits(raw)
    stream, optimiser = data_mod.train_stream(raw, 0, splits.train), torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(60):
        x, y = stream.next()
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    torch.save(model.state_dict(), workdir / "weights.pt")
    model.eval()
    standard = DataConfig(**{k: v for k, v in vars(raw).items() if k not in RAW_PIXELS})

    def accuracy(cfg: DataConfig) -> float:
        test = data_mod.build_splits(cfg).test
        return top_k_accuracy(model, data_mod.eval_batches(test, cfg.eval_batch_size))["top1"]

    return accuracy(raw), accuracy(standard)


@pytest.mark.slow
def test_a_users_own_network_runs_the_whole_pipeline_by_reference(tmp_path: Path) -> None:
    """Issue #16: a CNN in the user's own module, their weights and their config; no class written for it."""
    (tmp_path / "user_net.py").write_text(USER_NET)
    configfile = user_config(tmp_path)
    network = yaml.safe_load(configfile.read_text())["networks"][0]
    raw_top1, standard_top1 = user_weights(tmp_path, network["data"])
    assert raw_top1 > 40 and abs(raw_top1 - standard_top1) > 10, (raw_top1, standard_top1)

    start = time.monotonic()
    done = run_in(tmp_path, configfile, "local", 900)
    assert done.returncode == 0, tail(done)
    counts = job_counts(output(done))
    print(f"user network end to end: {time.monotonic() - start:.0f} s, jobs {counts}")
    check_outputs(tmp_path, "usernet", counts)

    results = tmp_path / "results" / "usernet" / network["name"]
    imported = json.loads((results / "original" / "imported" / "metrics.json").read_text())
    assert imported["test_top1"] == pytest.approx(raw_top1, abs=1e-6)  # the import read raw pixels
    from nern.artifacts import read_metadata

    stored = read_metadata(results / "original" / "imported" / "model.safetensors")["model"]
    assert stored["factory"] == "user_net.py:build" and stored["kwargs"] == {"width": 8}
    main = pd.read_csv(tmp_path / "results" / "tables" / "usernet" / "main.csv")
    assert len(main) == 2 and set(main["model"]) == {"user_net.py:build"}
    fits = sorted(results.glob("fit/fast/imported/*/h16/metrics.json"))
    assert len(fits) == 2
    for path in fits:
        metrics = json.loads(path.read_text())
        assert math.isfinite(metrics["reconstructed_top1"]) and 0 <= metrics["reconstructed_top1"] <= 100, path
        assert metrics["original_top1"] == pytest.approx(raw_top1, abs=1e-6), path
    for stage in ("compress", "importance"):  # each evaluates the original network on the user's inputs too
        found = sorted(results.glob(f"fit/**/{stage}/metrics.json"))
        assert len(found) == 1, stage
        assert json.loads(found[0].read_text())["original_top1"] == pytest.approx(raw_top1, abs=1e-6), stage


def check_report(html: str, workdir: Path, preset: str) -> None:
    """The report lists every table and figure, the applications' next to the paper's, each with its caption
    rendered (wildcards filled in)."""
    results = workdir / "results"
    shown = [results / "tables" / preset / "main.csv", results / "figures" / preset / "accuracy_vs_size.png"]
    for stage, names in {"compress": ["compression.csv", "accuracy_vs_bytes.png"],
                         "importance": ["importance.csv", "pruning.png", "error_maps.png", "kernels.png"]}.items():
        found = sorted((results / preset).glob(f"**/{stage}/{names[0]}"))
        assert found, f"no {stage} outputs"
        shown += [path.parent / name for path in found for name in names]
    for path in shown:
        assert json.dumps(str(path.relative_to(workdir))) in html, f"{path} is not in the report"
    for category in ("Tables", "Figures", "Meta-compression", "Weight importance"):
        assert json.dumps(category) in html, category
    assert "Meta-compression of the NeRN fit" in html and "Weight importance from NeRN" in html
    assert "{{ snakemake" not in html


def one_chain_config() -> dict:
    """The tiny preset trimmed to one chain per stage (pretrain, 2 permutations, 2 fits, compress, importance,
    tables), for the runs that must stay short."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    network = config["networks"][0]
    network["grid"]["permutations"] = ["none", "crossfilter"]
    network["reference"] = {"permutation": "crossfilter"}
    network.pop("regularisation", None)
    network["ablations"] = []
    network["data_free"] = {}
    return config


def slurm_config(path: Path) -> Path:
    config = one_chain_config()
    config["name"] = "slurm"
    path.write_text(yaml.safe_dump(config))
    return path


def slurm_job_states(text: str) -> list[str]:
    """'<snakemake job> <slurm job id> <rule> <state>' for every job Snakemake submitted."""
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", text)
    rules = {job: rule for rule, job in re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)$",
                                                   text, re.M)}
    lines = []
    for job, slurm_id in submitted:
        state = subprocess.run(["squeue", "-h", "--states=all", "-j", slurm_id, "-o", "%T"],
                               capture_output=True, text=True).stdout.strip()
        lines.append(f"SLURM job {slurm_id} (snakemake job {job}, rule {rules.get(job, '?')}): "
                     f"{state or 'gone from squeue'}")
    return lines


@pytest.mark.slurm
def test_tiny_preset_runs_on_a_real_slurm_cluster(slurm_cluster: str, tmp_path: Path) -> None:
    configfile = slurm_config(tmp_path / "slurm.yaml")
    start = time.monotonic()
    done = run_in(tmp_path, configfile, "slurm-ci", 1200)
    wall = time.monotonic() - start
    states = slurm_job_states(output(done))
    print(f"Slurm end-to-end run (partition {slurm_cluster}): {wall:.0f} s")
    print("\n".join(states))
    assert done.returncode == 0, tail(done)
    counts = job_counts(output(done))
    submitted = sum(n for rule, n in counts.items() if rule not in ("all", "manifest"))
    assert len(states) == submitted, (states, counts)
    assert all("COMPLETED" in line for line in states), states
    check_outputs(tmp_path, "slurm", counts)


def running_slurm_job(comment_prefix: str) -> str | None:
    """The id of the RUNNING Slurm job whose comment (the executor writes `rule_<name>_wildcards_...`) starts so."""
    listing = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        job, _, comment = line.strip().partition(" ")
        if comment.startswith(comment_prefix):
            return job
    return None


def slurm_state_when(job: str, wanted: str, timeout_s: float = 60) -> str:
    """The job's state once it is `wanted` (or whatever it is when the time is up): read at once, before
    Slurm forgets a finished job (MinJobAge)."""
    deadline, state = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        if state == wanted:
            break
        time.sleep(0.2)
    return state or "gone from squeue"


@pytest.mark.slurm
def test_a_fit_cancelled_with_scancel_is_rerun_and_resumes_from_its_checkpoint(slurm_cluster: str,
                                                                               tmp_path: Path) -> None:
    config = yaml.safe_load(slurm_config(tmp_path / "slurm.yaml").read_text())
    config["name"] = "scancel"
    network = config["networks"][0]
    network["grid"]["permutations"] = ["none"]
    network["reference"] = {"permutation": "none"}
    iterations = 2000  # long enough to be cancelled mid-fit; checkpoints every 25 iterations
    network["fit"].update({"iterations": iterations, "eval_every": 0, "checkpoint_every": 25})
    configfile = tmp_path / "scancel.yaml"
    configfile.write_text(yaml.safe_dump(config))
    fit_dir = tmp_path / "results" / "scancel" / network["name"] / "fit" / "fast" / "reg0" / "none" / "h16"
    target = fit_dir / "metrics.json"

    command = [sys.executable, "-m", "snakemake", str(target.relative_to(tmp_path)), "--snakefile", str(SNAKEFILE),
               "--directory", str(tmp_path), "--configfile", str(configfile),
               "--profile", str(REPO / "workflow" / "profiles" / "slurm-ci"), "--retries", "1"]
    run = faults.chain("fit under Slurm, scancel")
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        cancelled = None
        while cancelled is None:
            assert proc.poll() is None, f"snakemake ended before the fit could be cancelled:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "the fit wrote no checkpoint in 900 s"
            if (fit_dir / "checkpoint.pt").is_file():
                cancelled = running_slurm_job("rule_fit")
            time.sleep(0.2)
        subprocess.run(["scancel", cancelled], check=True)
        run.killed("scancel")
        cancel_state = slurm_state_when(cancelled, "CANCELLED")
        text, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    states = slurm_job_states(text)
    print(f"scancel'd SLURM job {cancelled} mid-fit: {cancel_state}; Snakemake's jobs:")
    print("\n".join(states))
    assert proc.returncode == 0, text[-6000:]
    fit_jobs = [line for line in states if "rule fit)" in line]
    assert len(fit_jobs) == 2 and f"SLURM job {cancelled} " in fit_jobs[0], states
    assert cancel_state == "CANCELLED" and "COMPLETED" in fit_jobs[1], (cancel_state, states)
    metrics = json.loads(target.read_text())
    assert metrics["resumed"] is True, "the rerun started afresh instead of resuming from the checkpoint"
    assert metrics["distillation_iterations"] == iterations  # the fast preset's rec-only steps come on top
    fits = [r for r in finished_runs(tmp_path, "scancel") if r.data.tags.get("rule") == "fit"]
    assert len(fits) == 1, f"{len(fits)} finished MLflow runs for one cancelled-and-resumed fit"
    assert all_runs(tmp_path, "scancel") == len(finished_runs(tmp_path, "scancel")), "an unfinished run was left"
    run.completed()


def test_stage_times_groups_benchmark_files_by_stage(tmp_path: Path) -> None:
    import runpy

    stage_times = runpy.run_path(str(REPO / "workflow" / "scripts" / "stage_times.py"))["stage_times"]
    files = {"net/fit/fast/reg0/none/h8.tsv": 10.0, "net/fit/fast/reg0/none/h16.tsv": 30.0,
             "net/original/reg0.tsv": 5.0, "net/fit/fast/reg0/none/h16/compress.tsv": 7.0}
    for name, seconds in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"s\th:m:s\n{seconds}\t0:00:{int(seconds):02d}\n")
    table = stage_times(tmp_path)
    assert table.loc["fit", "jobs"] == 2 and table.loc["fit", "total_s"] == 40.0
    assert table.loc["compress", "total_s"] == 7.0 and table.loc["pretrain / import", "total_s"] == 5.0
    assert table.loc["all stages", "total_s"] == 52.0


def test_record_run_copies_tables_figures_and_application_outputs_unchanged(tmp_path: Path) -> None:
    import runpy

    run, out = tmp_path / "run", tmp_path / "record"
    files = {"results/tables/p/main.md": "| a |\n", "results/figures/p/acc.png": "png",
             "results/p/net/fit/x/compress/compression.md": "c", "results/p/net/fit/x/compress/files/a.nernz": "big",
             "results/p/net/fit/x/importance/pruning.png": "i", "benchmarks/p/net/fit/x.tsv": "s\th:m:s\n12.5\t0:00:12\n"}
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    main = runpy.run_path(str(REPO / "workflow" / "scripts" / "record_run.py"))["main"]
    assert main(["--preset", "p", "--command", "snakemake x", "--wall-seconds", "600", "--run-dir", str(run),
                 "--out", str(out)]) == 0
    assert (out / "tables" / "main.md").read_text() == "| a |\n"
    assert (out / "figures" / "acc.png").read_text() == "png"
    assert (out / "net/fit/x/compress/compression.md").read_text() == "c"
    assert (out / "net/fit/x/importance/pruning.png").is_file()
    assert not (out / "net/fit/x/compress/files").exists()  # the measured files stay in the run
    record = (out / "RUN.md").read_text()
    assert "snakemake x" in record and "10.0 minutes" in record and "12.5" in record


def test_merge_frontiers_keeps_the_original_once_and_recomputes_the_front(tmp_path: Path) -> None:
    import runpy

    merge = runpy.run_path(str(REPO / "workflow" / "scripts" / "merge_frontiers.py"))["merge"]
    header = "network,fit,representation,precision,sparsity,finetune,bytes,top1,delta_top1,pareto\n"
    runs = {"a": ["net,original,original,nnc-20,0,none,100,79.0,-2,True", "net,f/h8,nern,int4,0,none,60,70.0,-11,True"],
            "b": ["net,original,original,nnc-20,0,none,100,79.0,-2,True", "net,f/h8,nern,int4,0,none,50,75.0,-6,True",
                  "other,f/h8,nern,int4,0,none,10,99.0,18,True"]}
    for name, lines in runs.items():
        (tmp_path / name / "tables").mkdir(parents=True)
        (tmp_path / name / "tables" / "rate_distortion.csv").write_text(header + "\n".join(lines) + "\n")
    rows = merge([tmp_path / "a", tmp_path / "b"], "net", None)
    assert sorted(rows["fit"]) == ["a:f/h8", "b:f/h8", "original"]  # the other network left out, the original once
    front = dict(zip(rows["fit"], rows["pareto"]))
    assert front == {"b:f/h8": True, "a:f/h8": False, "original": True}  # a's file is beaten by b's, smaller
    assert list(merge([tmp_path / "a", tmp_path / "b"], "net", 80)["fit"]) == ["b:f/h8", "a:f/h8"]
