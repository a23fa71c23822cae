"""nern.grid: the experiment design of a pipeline preset (rows, manifest, overrides, validation), no Snakemake."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from nern import grid
from nern.errors import NernError

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"fast": "config/recipes/fast.yaml", "paper": "config/recipes/paper.yaml"}


def preset(**network_extra) -> dict:
    """A small preset: one pretrained network, a 2 x 2 x 2 main grid, every kind of side table."""
    network = {
        "name": "net", "task": "Task", "published": None,
        "model": {"arch": "resnet8", "in_channels": 1, "num_classes": 10},
        "data": {"name": "fashion_mnist", "root": "data"},
        "original": {"source": "pretrain", "set": {"epochs": 1}},
        "fit": {"iterations": 10, "eval_every": 5},
        "grid": {"fit_recipes": ["fast", "paper"], "smoothness": [0], "permutations": ["none", "crossfilter"],
                 "hidden": [8, 16]},
        "reference": {"permutation": "crossfilter", "hidden": 16},
        "regularisation": {"smoothness": [0, 1e-4], "permutations": ["none"]},
        "ablations": [{"group": "loss", "variants": [{"name": "rec", "set": {"loss.kd": 0, "loss.fmd": 0}},
                                                     {"name": "rec+kd+fmd"}]}],
        "data_free": {},
    }
    network.update(network_extra)
    return {"name": "unit", "description": "unit preset", "fit_recipes": dict(RECIPES), "networks": [network]}


def rows_of(config: dict, group: str) -> list[grid.Row]:
    return [row for row in grid.table_rows(config) if row.group == group]


# -- rows and manifest ---------------------------------------------------------------------------------------


def test_rows_fill_every_table_in_order_and_share_the_reference_fit() -> None:
    config = preset()
    rows = grid.table_rows(config)
    assert grid.table_names(rows) == ["main", "regularisation", "ablation_loss", "data_free"]
    main = rows_of(config, "main")
    assert len(main) == 2 * 2 * 2 and {row.label for row in main} == {"fast", "paper"}
    reference = "results/unit/net/fit/fast/reg0/crossfilter/h16"
    assert reference in {row.dir for row in main}
    ablation = {row.label: row for row in rows_of(config, "ablation_loss")}
    assert ablation["rec+kd+fmd"].dir == reference and ablation["rec+kd+fmd"].stage == "fit"
    assert ablation["rec"].dir == "results/unit/net/ablation/rec/fast/reg0/crossfilter/h16"
    assert ablation["rec"].overrides == {"loss.fmd": 0, "loss.kd": 0}
    regularisation = rows_of(config, "regularisation")
    assert [row.dir for row in regularisation] == ["results/unit/net/fit/fast/reg0/none/h16",
                                                   "results/unit/net/fit/fast/reg0.0001/none/h16"]
    free = rows_of(config, "data_free")
    assert [(row.label, row.stage, row.data_free) for row in free] == [("task data", "fit", False),
                                                                     ("data-free", "data-free", True)]
    assert free[0].dir == reference and free[1].dir == "results/unit/net/data-free/fast/reg0/crossfilter/h16"


def test_extra_grid_products_add_points_to_the_main_table_once_each() -> None:
    """crossfilter at two sizes plus none at one: no single product gives it."""
    config = preset()
    config["networks"][0]["grid"].update(fit_recipes=["fast"], permutations=["crossfilter"],
                                         extra=[{"permutations": ["none"], "hidden": [16]},
                                                {"permutations": ["crossfilter"]}])  # all given already
    main = rows_of(config, "main")
    assert [(row.fit_preset, row.permutation, row.hidden) for row in main] == [
        ("fast", "crossfilter", 8), ("fast", "crossfilter", 16), ("fast", "none", 16)]
    assert len({row.dir for row in main}) == len(main)


def test_a_point_given_several_seeds_is_one_row_of_one_fit_per_seed() -> None:
    """grid.seeds: seed 0 keeps the plain directory (a preset without seeds keeps its paths), seed s > 0 fits in
    h<hidden>-seed<s> with `seed` set; a point in two products has the union of their seeds."""
    config = preset()
    config["networks"][0]["grid"].update(fit_recipes=["fast"], permutations=["crossfilter"], hidden=[8, 16],
                                         extra=[{"hidden": [16], "seeds": [0, 1, 2]}, {"hidden": [16], "seeds": [3]}])
    main = {row.hidden: row for row in rows_of(config, "main")}
    assert main[8].seeds == [0] and main[8].seed_dirs == [main[8].dir]
    base = "results/unit/net/fit/fast/reg0/crossfilter/h16"
    assert main[16].seeds == [0, 1, 2, 3] and main[16].dir == base
    assert main[16].seed_dirs == [base, f"{base}-seed1", f"{base}-seed2", f"{base}-seed3"]
    metrics = grid.fit_metrics(grid.table_rows(config))
    assert {f"{base}-seed{s}/metrics.json" for s in (1, 2, 3)} <= set(metrics)
    seeded = grid.Fit("unit", "fit", "net", "fast", "reg0", "crossfilter", 16, seed=2)
    assert "seed=2" in grid.set_items(grid.fit_trees(config["networks"][0], seeded))
    assert not any(item.startswith("seed=") for item in fit_sets(config, "fit", "fast"))  # seed 0: the recipe's
    assert grid.seed_of_tag("-seed2") == 2 and grid.seed_of_tag("") == 0
    assert re.fullmatch(grid.SEED_TAG, "-seed12") and re.fullmatch(grid.SEED_TAG, "")
    assert not re.fullmatch(grid.SEED_TAG, "-seed0")  # seed 0 has one spelling: none
    assert {f"{base}-seed{s}" for s in (1, 2, 3)} <= set(grid.application_dirs(config, grid.table_rows(config)))


def test_grid_seeds_must_be_distinct_non_negative_integers() -> None:
    for bad in ([], [0, 0], [-1], ["a"]):
        config = preset()
        config["networks"][0]["grid"]["seeds"] = bad
        with pytest.raises(Exception, match="seeds"):
            schema_check(config)


def test_an_imported_network_has_one_original_and_no_smoothness() -> None:
    config = preset(original={"source": "import", "checkpoint": "w.th"})
    del config["networks"][0]["regularisation"]
    rows = grid.table_rows(config)
    assert {row.original for row in rows} == {"imported"} and {row.smoothness for row in rows} == {None}
    assert grid.original_metrics("unit", rows) == ["results/unit/net/original/imported/metrics.json"]


def test_the_manifest_round_trips_through_yaml_and_its_schema_names_a_missing_key() -> None:
    config = preset()
    manifest = grid.manifest(config, grid.table_rows(config))
    assert manifest.networks[0].originals == {"reg0": "results/unit/net/original/reg0",
                                              "reg0.0001": "results/unit/net/original/reg0.0001"}
    text = yaml.safe_dump(manifest.to_dict(), sort_keys=False)
    assert grid.Manifest.from_dict(yaml.safe_load(text)) == manifest
    broken = yaml.safe_load(text)
    del broken["rows"][3]["dir"]
    with pytest.raises(NernError, match=r"rows\[3\] has no 'dir'"):
        grid.Manifest.from_dict(broken)
    broken = yaml.safe_load(text)
    broken["rows"][0]["hiden"] = 8
    with pytest.raises(NernError, match="unknown key 'hiden'"):
        grid.Manifest.from_dict(broken)


def test_applications_run_on_every_fit_or_on_each_reference_fit() -> None:
    config = preset()
    rows = grid.table_rows(config)
    assert grid.application_dirs(config, rows) == sorted({row.dir for row in rows})
    config["applications"] = "reference"
    assert grid.application_dirs(config, rows) == ["results/unit/net/fit/fast/reg0/crossfilter/h16"]
    config["applications"] = {"compress": "all", "importance": "none"}
    assert grid.application_dirs(config, rows, "importance") == []
    assert grid.application_dirs(config, rows, "compress") == sorted({row.dir for row in rows})


# -- overrides -------------------------------------------------------------------------------------------------


def fit_sets(config: dict, stage: str, recipe: str, variant: str = "") -> list[str]:
    fit = grid.Fit("unit", stage, "net", recipe, "reg0", "crossfilter", 16, variant)
    return grid.set_items(grid.fit_trees(config["networks"][0], fit))


def test_fit_overrides_merge_network_preset_variant_and_size_in_order() -> None:
    config = preset(fit={"iterations": 10, "loss": {"kd": 0.5}},
                    fit_per_recipe={"paper": {"loss.kd": 1e-5, "loss.warmup": 7}})
    assert fit_sets(config, "fit", "fast") == ["data.name=fashion_mnist", "data.root=data", "iterations=10",
                                               "loss.kd=0.5", "predictor.hidden=16"]
    paper = fit_sets(config, "fit", "paper")
    assert "loss.kd=1e-05" in paper and "loss.warmup=7" in paper and "loss.kd=0.5" not in paper
    assert "loss.kd=0" in fit_sets(config, "ablation", "paper", "rec")  # the variant wins over both
    assert "data_free=true" in fit_sets(config, "data-free", "fast")
    assert fit_sets(config, "fit", "fast") == sorted(fit_sets(config, "fit", "fast"))  # YAML order is irrelevant


def test_pretrain_and_import_overrides() -> None:
    network = preset()["networks"][0]
    assert grid.set_items(grid.original_trees(network, "0.0001"))[-1] == "smoothness=0.0001"
    assert "epochs=1" in grid.set_items(grid.original_trees(network, "0"))
    with pytest.raises(NernError, match="is pretrained"):
        grid.original_trees(network)
    imported = preset(original={"source": "import", "checkpoint": "w.th"})["networks"][0]
    assert "model.checkpoint=w.th" in grid.set_items(grid.original_trees(imported))
    with pytest.raises(NernError, match="imports its weights"):
        grid.original_trees(imported, "0")


def test_set_args_quote_values_for_the_shell() -> None:
    args = grid.set_args([("t", {"optim": {"betas": [0.9, 0.99]}, "data.root": "a dir"})])
    assert args == "--set 'data.root=a dir' --set 'optim.betas=[0.9, 0.99]'"


# -- validation before any job starts ------------------------------------------------------------------------


def validate(config: dict) -> None:
    grid.validate_jobs(config, REPO, grid.table_rows(config))


def test_a_valid_preset_validates() -> None:
    validate(preset(fit_per_recipe={"paper": {"loss.kd": 1e-5}}))


@pytest.mark.parametrize("change,needle", [
    (lambda n: n["ablations"][0]["variants"][0]["set"].update({"loss.kdd": 0}),
     r"networks\[net\]\.ablations\[loss\]\.variants\[rec\]\.set: unknown config key 'loss\.kdd'"),
    (lambda n: n.update(fit_per_recipe={"paper": {"sampling": {"methd": "all"}}}),
     r"networks\[net\]\.fit_per_recipe\.paper: unknown config key 'sampling\.methd'"),
    (lambda n: n["fit"].update({"iteratons": 5}), r"networks\[net\]\.fit: unknown config key 'iteratons'"),
    (lambda n: n["original"]["set"].update({"loss.kd": 0}),  # a fit key in the pretraining settings
     r"networks\[net\]\.original\.set: unknown config key 'loss'"),
    (lambda n: n["data"].update({"batch_sise": 4}), r"networks\[net\]\.data: unknown config key 'data\.batch_sise'"),
    (lambda n: n["fit"].update({"sampling.method": "bogus"}), r"networks\[net\]\.fit: config key 'sampling\.method'"),
])
def test_a_typo_anywhere_fails_naming_the_key_and_where_it_is(change, needle: str) -> None:
    config = preset()
    change(config["networks"][0])
    with pytest.raises(NernError, match=needle):
        validate(config)


def test_a_merged_setting_out_of_range_names_the_job() -> None:
    config = preset(fit_per_recipe={"paper": {"predictor.depth": 1}})
    with pytest.raises(NernError, match=r"fit results/unit/net/fit/paper/.*'predictor\.depth'"):
        validate(config)
    validate(preset(fit_per_recipe={"fast": {"predictor.depth": 3}}))  # the same key in range is fine


@pytest.mark.parametrize("change,needle", [
    (lambda n: n.update(fit_per_recipe={"papr": {}}), r"networks\[net\]\.fit_per_recipe\.papr: fit recipe 'papr'"),
    (lambda n: n["grid"].update(fit_recipes=["fast", "slow"]),
     r"networks\[net\]\.grid\.fit_recipes: fit recipe 'slow'"),
    (lambda n: n["grid"].update(extra=[{"fit_recipes": ["slow"]}]),
     r"networks\[net\]\.grid\.extra\[0\]\.fit_recipes: fit recipe 'slow'"),
    (lambda n: n.update(fit_per_recipe={"paper": {"represent.max_kernel": 1}}),
     r"fit_per_recipe\.paper\.represent\.max_kernel: the represented layers are shared"),
    (lambda n: n["ablations"].append({"group": "again", "variants": [{"name": "rec", "set": {"loss.kd": 1}}]}),
     "variant 'rec' is defined twice"),
])
def test_network_consistency_the_schema_cannot_express(change, needle: str) -> None:
    config = preset()
    change(config["networks"][0])
    with pytest.raises(NernError, match=needle):
        grid.table_rows(config)


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(fit_presets=c.pop("fit_recipes")),
     r"^fit_presets is now fit_recipes \(fit recipes live in config/recipes/\); rename the key$"),
    (lambda c: c["networks"][0].update(fit_per_preset={"paper": {}}),
     r"^networks\[net\]\.fit_per_preset is now fit_per_recipe; "),
    (lambda c: c["networks"][0]["grid"].update(fit_presets=["fast"]),
     r"^networks\[net\]\.grid\.fit_presets is now grid\.fit_recipes; "),
    (lambda c: c["networks"][0]["grid"].update(extra=[{"fit_presets": ["fast"]}]),
     r"^networks\[net\]\.grid\.extra\[\]\.fit_presets is now grid\.extra\[\]\.fit_recipes; "),
    (lambda c: c["networks"][0]["reference"].update(fit_preset="fast"),
     r"^networks\[net\]\.reference\.fit_preset is now reference\.fit_recipe; "),
])
def test_a_key_of_the_old_fit_preset_vocabulary_fails_in_one_line_naming_the_new_key(change, needle: str) -> None:
    config = preset()
    grid.check_renamed_keys(config)  # the current keys pass
    change(config)
    with pytest.raises(NernError, match=needle) as error:
        grid.check_renamed_keys(config)
    assert "\n" not in str(error.value)


def test_a_network_resource_needs_a_preset_wide_default() -> None:
    config = preset(resources={"fit": {"runtime": 5}})
    config["resources"] = {"fit": {"mem_mb": 1}}
    with pytest.raises(NernError, match=r"networks\[net\]\.resources\.fit\.runtime"):
        grid.check_resources(config)
    config["resources"]["fit"]["runtime"] = 1
    grid.check_resources(config)
    assert grid.network_resource(config, "net", "fit", "runtime") == 5
    assert grid.network_resource(config, "net", "fit", "mem_mb") == 1


# -- the shipped presets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["config.yaml", "config/test.yaml", "config/cifar10-public.yaml",
                                  "config/paper.yaml", "config/cifar10-cpu.yaml", "config/cifar10-codec.yaml"])
def test_every_shipped_preset_validates(path: str) -> None:
    validate(yaml.safe_load((REPO / path).read_text()))


def preset_names(paths: list[Path]) -> list[str]:
    return [yaml.safe_load(path.read_text())["name"] for path in paths]


def test_config_holds_the_product_presets_and_every_preset_or_experiment_has_its_own_name() -> None:
    """One name per results/<name>/ and MLflow experiment: two files with one name would overwrite each other's
    tables. config/ keeps the presets a user picks; past sweeps are experiments/<topic>/*.yaml."""
    presets = [REPO / "config.yaml"] + sorted(p for p in (REPO / "config").glob("*.yaml") if p.name != "published.yaml")
    experiments = sorted((REPO / "experiments").glob("*/*.yaml"))
    assert sorted(preset_names(presets)) == sorted(["default", "test", "cifar10-cpu", "cifar10-public", "paper",
                                                    "cifar10-codec"])
    names = preset_names(presets + experiments)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert experiments and all(path.stem == name for path, name in zip(experiments, preset_names(experiments)))


def test_cifar10_public_gives_resnet56_the_papers_distillation_weights_under_paper_only() -> None:
    config = yaml.safe_load((REPO / "config" / "cifar10-public.yaml").read_text())
    network = grid.network(config, "cifar10-resnet56")
    sets = {p: grid.set_items(grid.fit_trees(network, grid.Fit("c", "fit", network["name"], p, "imported", "none", 280)))
            for p in ("fast", "paper")}
    assert "loss.kd=1e-05" in sets["paper"] and "loss.fmd=1e-05" in sets["paper"]
    assert not any(item.startswith(("loss.kd", "loss.fmd")) for item in sets["fast"])  # fast keeps its 1.0
    assert "iterations=5000" in sets["fast"] and "iterations=5000" in sets["paper"]


def test_validation_leaves_the_config_unchanged() -> None:
    config = preset()
    before = copy.deepcopy(config)
    validate(config)
    assert config == before  # the design reads the config; Snakemake's params see it unchanged


# -- a user's own network by reference ----------------------------------------------------------------------------

FACTORY_MODEL = {"factory": "examples/my_cnn.py:make_cnn", "kwargs": {"width": 8}, "in_channels": 1}
RAW_PIXELS = {"name": "fashion_mnist", "root": "data", "input_range": 255, "mean": [0], "std": [1]}


def factory_preset(source: str = "import") -> dict:
    original = {"source": "import", "checkpoint": "my_cnn.pt"} if source == "import" else {"source": "pretrain"}
    config = preset(model=dict(FACTORY_MODEL), data=dict(RAW_PIXELS), original=original)
    if source == "import":
        del config["networks"][0]["regularisation"]
    return config


def schema_check(config: dict) -> None:
    from snakemake.utils import validate as snakemake_validate

    snakemake_validate(copy.deepcopy(config), str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def test_a_factory_network_names_its_tables_rows_by_module_and_function() -> None:
    config = factory_preset()
    rows = grid.table_rows(config)
    assert {row.arch for row in rows} == {"my_cnn.py:make_cnn"}
    assert [n.arch for n in grid.manifest(config, rows).networks] == ["my_cnn.py:make_cnn"]
    assert grid.model_name(preset()["networks"][0]) == "resnet8"
    assert grid.model_name({"model": {"factory": "pkg.nets:build", "arch": "resnet20"}}) == "pkg.nets:build"


def test_a_factory_file_is_an_input_of_the_original_and_a_module_reference_is_not() -> None:
    assert grid.model_sources(factory_preset()["networks"][0]) == ["examples/my_cnn.py"]
    assert grid.model_sources({"model": {"factory": "pkg.nets:build"}}) == []
    assert grid.model_sources(preset()["networks"][0]) == []


@pytest.mark.parametrize("source", ["import", "pretrain"])
def test_a_factory_network_and_its_input_range_reach_every_job_that_reads_data(source: str) -> None:
    config = factory_preset(source)
    validate(config)
    network = config["networks"][0]
    raw = {"data.input_range=255", "data.mean=[0]", "data.std=[1]"}
    original = set(grid.set_items(grid.original_trees(network, None if source == "import" else "0")))
    assert {"model.factory=examples/my_cnn.py:make_cnn", "model.kwargs.width=8", "model.in_channels=1"} <= original
    assert raw <= original
    assert ("model.checkpoint=my_cnn.pt" in original) == (source == "import")
    for row in grid.table_rows(config):
        assert raw <= set(grid.set_items(grid.fit_trees(network, grid.row_fit("unit", row)))), row.dir


def test_the_schema_takes_an_arch_or_a_factory_and_checks_the_reference() -> None:
    schema_check(factory_preset())
    schema_check(preset())
    for model, needle in [({"in_channels": 1}, "arch"), ({"factory": "my_cnn"}, "does not match"),
                          ({"factory": "my_cnn.py:"}, "does not match")]:
        config = factory_preset()
        config["networks"][0]["model"] = model
        with pytest.raises(Exception, match=needle):
            schema_check(config)


def test_the_users_example_pipeline_config_validates() -> None:
    config = yaml.safe_load((REPO / "examples" / "my_cnn_pipeline.yaml").read_text())
    schema_check(config)
    validate(config)
    assert {row.arch for row in grid.table_rows(config)} == {"my_cnn.py:make_cnn"}


def test_a_finetuned_network_trains_one_original_per_factor_from_its_imported_weights() -> None:
    """original.source finetune: imported weights trained further on the task (an in-domain original), with the
    regularisation table available as for a pretrained network."""
    config = preset(original={"source": "finetune", "checkpoint": "w.th", "set": {"epochs": 1, "lr": 0.01}})
    network = config["networks"][0]
    rows = grid.table_rows(config)
    assert {row.original for row in rows} == {"reg0", "reg0.0001"}
    start = grid.finetune_start("unit", network)
    assert start == "results/unit/net/original/imported/model.safetensors"
    trained = grid.set_items(grid.original_trees(network, "0.0001", start))
    assert {"epochs=1", "lr=0.01", "smoothness=0.0001", f"model.checkpoint={start}"} <= set(trained)
    imported = grid.set_items(grid.original_trees(network))
    assert "model.checkpoint=w.th" in imported and "epochs=1" not in imported  # `set` is the training's
    with pytest.raises(NernError, match="fine-tuned"):
        grid.original_trees(network, "0")
    assert grid.finetune_start("unit", preset()["networks"][0]) is None
    validate(config)
