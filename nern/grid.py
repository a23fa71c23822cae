"""The experiment design of one pipeline preset, without Snakemake: which fits a preset asks for, which table
row each fills (the manifest that `nern tables` reads), and the `--set` overrides every job runs with.

The workflow (workflow/rules/*.smk) turns these into rules and paths. Everything a preset can get wrong is
checked here when the DAG is built, so a typo fails before any job starts, naming the key: consistency the
JSON schema cannot express (`check_network`), and every job's merged settings against the typed configs of
nern.config (`validate_jobs`).

A network's `model` is a built-in `arch` or a user's network by reference (`factory`, `kwargs`, see
nern.models); it is imported from weights (`original.source: import`), pretrained from its init (`pretrain`), or
imported and then trained further on the network's own training split (`finetune`: an in-domain original).

A fit's settings merge in this order, later winning: the fit recipe file (config/recipes/), the network's
`data`, its `fit`, its `fit_per_recipe[<recipe>]`, the ablation variant's `set` (or data_free=true), the grid's
hidden size. A "preset" is a whole pipeline config (config.yaml, config/*.yaml); a "recipe" is one fit's
settings file. Keys renamed from the older "fit preset" vocabulary fail with the new name (RENAMED_KEYS).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nern.artifacts import atomic_path
from nern.config import FitConfig, PretrainConfig, check_overrides, flatten, load_config, read_yaml
from nern.errors import NernError

Tree = dict[str, Any]
NamedTree = tuple[str, Tree]  # (where in the config it comes from, the overrides)

# -- the manifest: which run fills which table row (written by the workflow, read by nern.tables) ----------


@dataclass(frozen=True)
class Row:
    """One row of one table and the run directory whose metrics fill it."""

    group: str  # main | regularisation | ablation_<group> | data_free: the table
    label: str
    network: str
    task: str
    arch: str
    published: str | None  # key in the published-numbers file
    stage: str  # fit | ablation | data-free: which rule ran it
    fit_preset: str  # the fit recipe (the manifest's and the tables' name for it, kept so results compare)
    original: str  # reg<factor> | imported
    smoothness: float | None
    permutation: str
    hidden: int
    variant: str
    data_free: bool
    overrides: dict[str, Any]  # the row's own settings over the reference fit, flattened (ablations)
    dir: str  # the first seed's fit (its applications and curves)
    seeds: list[int] = field(default_factory=lambda: [0])  # one fit per seed, aggregated in the tables
    seed_dirs: list[str] = field(default_factory=list)  # their directories, in the order of `seeds`

    @property
    def fit_dirs(self) -> list[str]:
        """The directory of each seed's fit (a manifest written before seeds existed has `dir` only)."""
        return self.seed_dirs or [self.dir]


@dataclass(frozen=True)
class ManifestNetwork:
    name: str
    task: str
    arch: str
    published: str | None
    originals: dict[str, str] = field(default_factory=dict)  # original id -> its directory


@dataclass(frozen=True)
class Manifest:
    preset: str
    description: str
    networks: list[ManifestNetwork]
    rows: list[Row]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        """Parse a manifest file's mapping; a missing or unknown key means it was written by another version."""
        top = _fields(cls, data, source)
        return cls(preset=top["preset"], description=top["description"],
                   networks=[ManifestNetwork(**_fields(ManifestNetwork, n, f"{source} networks[{i}]"))
                             for i, n in enumerate(top["networks"])],
                   rows=[Row(**_fields(Row, r, f"{source} rows[{i}]")) for i, r in enumerate(top["rows"])])


def _fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise NernError(f"{where} must be a mapping; regenerate the manifest with the pipeline's manifest rule")
    known = {f.name: f for f in dataclasses.fields(cls)}
    required = [name for name, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in data:
            raise NernError(f"{where} has no '{name}'; regenerate the manifest with the pipeline's manifest rule")
    for name in data:
        if name not in known:
            raise NernError(f"{where} has an unknown key '{name}'; regenerate the manifest with the pipeline")
    return dict(data)


# -- the fits a preset asks for ----------------------------------------------------------------------------


# Where each result lives below results/<preset>/<network>/: the one place these paths are spelled. The workflow's
# rules fill the templates' {wildcards} (workflow/rules/common.smk); the manifest names the same directories.
ORIGINAL_DIR = "original/{orig}"  # orig: imported, or reg<factor> (pretrained or fine-tuned with that factor)
PERMUTATION_STEM = "permutation/{orig}/{perm}"  # .safetensors (positions), .json, .model.safetensors (symmetry)
FIT_POINT = "{fit_recipe}/{orig}/{perm}/h{hidden}{seed}"  # seed: "" (seed 0, the recipe's own) or -seed<s>
SEED_TAG = r"(-seed[1-9][0-9]*)?"  # the {seed} wildcard's pattern: empty for seed 0
FIT_DIRS = {"fit": f"fit/{FIT_POINT}", "ablation": f"ablation/{{variant}}/{FIT_POINT}",
            "data-free": f"data-free/{FIT_POINT}"}


def results_dir(preset: str) -> str:
    return f"results/{preset}"


@dataclass(frozen=True)
class Fit:
    """One NeRN fit job; its directory is its identity (a fit shared by several tables runs once)."""

    preset: str  # the pipeline preset (config name)
    stage: str  # fit | ablation | data-free
    net: str
    fit_recipe: str
    orig: str
    perm: str
    hidden: int
    variant: str = ""
    seed: int = 0  # 0: the fit recipe's own seed (FitConfig.seed); s > 0 is set on the fit

    @property
    def point(self) -> str:
        return FIT_POINT.format(fit_recipe=self.fit_recipe, orig=self.orig, perm=self.perm, hidden=self.hidden,
                                seed=seed_tag(self.seed))

    @property
    def dir(self) -> str:
        below = FIT_DIRS[self.stage].format(variant=self.variant, fit_recipe=self.fit_recipe, orig=self.orig,
                                            perm=self.perm, hidden=self.hidden, seed=seed_tag(self.seed))
        return f"{results_dir(self.preset)}/{self.net}/{below}"

    def with_seed(self, seed: int) -> Fit:
        return dataclasses.replace(self, seed=seed)


def seed_tag(seed: int) -> str:
    """A fit directory's seed suffix: none for seed 0, so a preset without seeds keeps its paths."""
    return f"-seed{seed}" if seed else ""


def seed_of_tag(tag: str) -> int:
    return int(tag.removeprefix("-seed")) if tag else 0


def network(config: Tree, name: str) -> Tree:
    for net in config["networks"]:
        if net["name"] == name:
            return net
    raise NernError(f"no network '{name}' in networks ({', '.join(n['name'] for n in config['networks'])})")


def model_name(net: Tree) -> str:
    """The tables' `arch` column: the built-in arch, or a user factory's module and function without its folder
    ("examples/my_cnn.py:make_cnn" -> "my_cnn.py:make_cnn"), as a factory wins over an arch (nern.config)."""
    factory = net["model"].get("factory")
    if not factory:
        return net["model"]["arch"]
    source, _, function = factory.rpartition(":")
    return f"{Path(source).name}:{function}"


def model_sources(net: Tree) -> list[str]:
    """The files an original network is built from besides its weights: a factory's .py file (a reference to
    an importable module is not a file the workflow can see change)."""
    source = (net["model"].get("factory") or "").rpartition(":")[0]
    return [source] if source.endswith(".py") else []


def factor_id(smoothness: float) -> str:
    return f"{float(smoothness):g}"


def original_id(net: Tree, smoothness: float | None = None) -> str:
    if net["original"]["source"] == "import":
        return "imported"
    return f"reg{factor_id(0 if smoothness is None else smoothness)}"


def grid_smoothness(net: Tree, product: Tree | None = None) -> list[float | None]:
    product = net["grid"] if product is None else product
    return product.get("smoothness", [0]) if trains_original(net) else [None]


def trains_original(net: Tree) -> bool:
    """Whether the pipeline trains this network's originals (one per smoothness factor): `pretrain` from its init,
    `finetune` from its imported weights on the task's own training split (an in-domain original)."""
    return net["original"]["source"] in ("pretrain", "finetune")


def finetune_start(preset: str, net: Tree) -> str | None:
    """The imported model a `finetune` original starts from (the import job's output), else None."""
    if net["original"]["source"] != "finetune":
        return None
    return f"{original_dir(preset, net['name'], 'imported')}/model.safetensors"


def grid_products(net: Tree) -> list[Tree]:
    """The main table is the grid's product plus each `grid.extra` product (a key it omits is the grid's), so
    a table can hold points no single product gives (crossfilter at two sizes, none at one)."""
    base = {key: value for key, value in net["grid"].items() if key != "extra"}
    return [base] + [{**base, **extra} for extra in net["grid"].get("extra") or []]


def reference(net: Tree) -> dict[str, Any]:
    """The point the ablations, regularisation and data-free runs share (default: the grid's first values)."""
    grid, ref = net["grid"], net.get("reference") or {}
    return {
        "fit_recipe": ref.get("fit_recipe", grid["fit_recipes"][0]),
        "smoothness": ref.get("smoothness", grid_smoothness(net)[0]),
        "permutation": ref.get("permutation", grid["permutations"][0]),
        "hidden": ref.get("hidden", grid["hidden"][0]),
    }


def reference_fit(preset: str, net: Tree, stage: str = "fit", variant: str = "", perm: str | None = None,
                  hidden: int | None = None) -> Fit:
    ref = reference(net)
    return Fit(preset, stage, net["name"], ref["fit_recipe"], original_id(net, ref["smoothness"]),
               perm or ref["permutation"], hidden or ref["hidden"], variant)


def ablation_variants(net: Tree) -> list[tuple[str, Tree]]:
    """(group, variant) of every ablation variant, in table order."""
    return [(group["group"], variant) for group in net.get("ablations") or [] for variant in group["variants"]]


def variant_set(net: Tree, name: str) -> NamedTree:
    """The overrides of ablation variant `name` and where they are in the config."""
    for group, variant in ablation_variants(net):
        if variant["name"] == name:
            return f"networks[{net['name']}].ablations[{group}].variants[{name}].set", variant.get("set") or {}
    raise NernError(f"network {net['name']} has no ablation variant '{name}'")


# -- consistency the schema cannot express -----------------------------------------------------------------


def check_network(config: Tree, net: Tree) -> None:
    """Fails before any job starts, naming the key."""
    name, recipes = net["name"], config["fit_recipes"]
    used = [("grid.fit_recipes", r) for r in net["grid"]["fit_recipes"]]
    used += [(f"grid.extra[{i}].fit_recipes", r) for i, extra in enumerate(net["grid"].get("extra") or [])
             for r in extra.get("fit_recipes", [])]
    used += [("reference.fit_recipe", (net.get("reference") or {}).get("fit_recipe"))]
    used += [(f"fit_per_recipe.{r}", r) for r in net.get("fit_per_recipe") or {}]
    for key, recipe in used:
        if recipe is not None and recipe not in recipes:
            raise NernError(f"networks[{name}].{key}: fit recipe '{recipe}' is not in fit_recipes "
                            f"({', '.join(recipes)})")
    for recipe, tree in (net.get("fit_per_recipe") or {}).items():
        for key in flatten(tree):
            if key.startswith("represent."):
                raise NernError(f"networks[{name}].fit_per_recipe.{recipe}.{key}: the represented layers are "
                                f"shared by all fits of a network (its permutations cover them); set it in "
                                f"networks[{name}].fit")
    if net["original"]["source"] == "import":
        if "regularisation" in net:
            raise NernError(f"networks[{name}].regularisation: an imported network has no pretraining to regularise")
        if "smoothness" in (net.get("reference") or {}):
            raise NernError(f"networks[{name}].reference.smoothness: an imported network has no smoothness factor")
    known: dict[str, Tree] = {}
    for _, variant in ablation_variants(net):
        settings = flatten(variant.get("set"))
        if known.setdefault(variant["name"], settings) != settings:
            raise NernError(f"networks[{name}]: ablation variant '{variant['name']}' is defined twice, "
                            "with different settings")


def check_resources(config: Tree) -> None:
    """A network's resources override the preset's per key, so each key needs a preset-wide default."""
    for net in config["networks"]:
        for rule, extra in (net.get("resources") or {}).items():
            missing = sorted(set(extra) - set((config.get("resources") or {}).get(rule, {})))
            if missing:
                raise NernError(f"networks[{net['name']}].resources.{rule}.{missing[0]} needs a preset-wide "
                                f"default in resources.{rule}")


# Keys of the older vocabulary, where "fit preset" meant what is now a fit recipe (config/recipes/).
RENAMED_KEYS = {"fit_presets": "fit_recipes"}
RENAMED_NETWORK_KEYS = {"fit_per_preset": "fit_per_recipe", "grid.fit_presets": "grid.fit_recipes",
                        "grid.extra[].fit_presets": "grid.extra[].fit_recipes",
                        "reference.fit_preset": "reference.fit_recipe"}


def check_renamed_keys(config: Tree) -> None:
    """A config written with an old key fails on the first one, naming the new key (run before the schema,
    which would only say that the old key is not allowed)."""
    for old, new in RENAMED_KEYS.items():
        if old in config:
            raise NernError(f"{old} is now {new} (fit recipes live in config/recipes/); rename the key")
    for net in config.get("networks") or []:
        grid_keys = net.get("grid") or {}
        present = {"fit_per_preset": "fit_per_preset" in net, "grid.fit_presets": "fit_presets" in grid_keys,
                   "grid.extra[].fit_presets": any("fit_presets" in extra for extra in grid_keys.get("extra") or []),
                   "reference.fit_preset": "fit_preset" in (net.get("reference") or {})}
        for old, new in RENAMED_NETWORK_KEYS.items():
            if present[old]:
                raise NernError(f"networks[{net.get('name')}].{old} is now {new}; rename the key")


def network_resource(config: Tree, net: str, rule: str, key: str) -> Any:
    return (network(config, net).get("resources") or {}).get(rule, {}).get(key, config["resources"][rule][key])


# -- the table rows they fill --------------------------------------------------------------------------------


def _row(group: str, label: Any, net: Tree, fit: Fit, smoothness: float | None, overrides: Tree | None = None) -> Row:
    return Row(group=group, label=str(label), network=net["name"], task=net["task"], arch=model_name(net),
               published=net.get("published"), stage=fit.stage, fit_preset=fit.fit_recipe, original=fit.orig,
               smoothness=None if smoothness is None else float(smoothness), permutation=fit.perm,
               hidden=int(fit.hidden), variant=fit.variant, data_free=fit.stage == "data-free",
               overrides=dict(sorted(flatten(overrides).items())), dir=fit.dir, seeds=[fit.seed],
               seed_dirs=[fit.dir])


def main_rows(preset: str, net: Tree) -> list[Row]:
    """One row per distinct point of the grid's products, in the order they are first given; its seeds are the
    union of the products' that give it (one fit each, aggregated in the tables)."""
    rows: dict[str, Row] = {}
    seeds: dict[str, list[int]] = {}
    for product in grid_products(net):
        for recipe in product["fit_recipes"]:
            for s in grid_smoothness(net, product):
                for perm in product["permutations"]:
                    for h in product["hidden"]:
                        fit = Fit(preset, "fit", net["name"], recipe, original_id(net, s), perm, h)
                        rows.setdefault(fit.dir, _row("main", recipe, net, fit, s))
                        seeds[fit.dir] = list(dict.fromkeys([*seeds.get(fit.dir, []), *product.get("seeds", [0])]))
    return [with_seeds(row, preset, seeds[key]) for key, row in rows.items()]


def with_seeds(row: Row, preset: str, seeds: list[int]) -> Row:
    fits = row_fits(preset, dataclasses.replace(row, seeds=seeds))
    return dataclasses.replace(row, dir=fits[0].dir, seeds=seeds, seed_dirs=[fit.dir for fit in fits])


def regularisation_rows(preset: str, net: Tree) -> list[Row]:
    reg, ref = net.get("regularisation"), reference(net)
    if not reg:
        return []
    return [_row("regularisation", factor_id(s), net,
                 Fit(preset, "fit", net["name"], ref["fit_recipe"], original_id(net, s), perm, h), s)
            for s in reg["smoothness"] for perm in reg.get("permutations", [ref["permutation"]])
            for h in reg.get("hidden", [ref["hidden"]])]


def ablation_rows(preset: str, net: Tree) -> list[Row]:
    """A variant without settings is the reference fit itself."""
    rows, smoothness = [], reference(net)["smoothness"]
    for group, variant in ablation_variants(net):
        settings = variant.get("set") or {}
        fit = reference_fit(preset, net, "ablation", variant["name"]) if flatten(settings) else reference_fit(preset, net)
        rows.append(_row(f"ablation_{group}", variant["name"], net, fit, smoothness, settings))
    return rows


def data_free_rows(preset: str, net: Tree) -> list[Row]:
    free, ref = net.get("data_free"), reference(net)
    if free is None:
        return []
    rows = []
    for perm in free.get("permutations", [ref["permutation"]]):
        for h in free.get("hidden", [ref["hidden"]]):
            rows.append(_row("data_free", "task data", net, reference_fit(preset, net, perm=perm, hidden=h),
                             ref["smoothness"]))
            rows.append(_row("data_free", "data-free", net, reference_fit(preset, net, "data-free", perm=perm, hidden=h),
                             ref["smoothness"], {"data_free": True}))
    return rows


def table_rows(config: Tree) -> list[Row]:
    """Every (table, row label) -> fit, in table order; checks each network first."""
    rows: list[Row] = []
    for net in config["networks"]:
        check_network(config, net)
        for rows_of in (main_rows, regularisation_rows, ablation_rows, data_free_rows):
            rows += rows_of(config["name"], net)
    return rows


def row_fit(preset: str, row: Row) -> Fit:
    """The fit of the row's first seed (the one its applications and curves use)."""
    return Fit(preset, row.stage, row.network, row.fit_preset, row.original, row.permutation, row.hidden, row.variant,
               row.seeds[0])


def row_fits(preset: str, row: Row) -> list[Fit]:
    """One fit per seed of the row."""
    return [row_fit(preset, row).with_seed(s) for s in row.seeds]


def table_names(rows: list[Row]) -> list[str]:
    """main, regularisation, ablation_<group>..., data_free: the tables `nern tables` writes, in order (and
    rate_distortion where fits are compressed: `compressed_networks`)."""
    return list(dict.fromkeys(row.group for row in rows))


def compression_tables(config: Tree, rows: list[Row]) -> list[str]:
    """The compress stage's table of every fit it runs on: what `nern tables` aggregates into rate_distortion."""
    return [f"{fit_dir}/compress/compression.csv" for fit_dir in application_dirs(config, rows, "compress")]


def compressed_networks(config: Tree, rows: list[Row]) -> list[str]:
    """The networks with at least one compressed fit, in config order (one rate-distortion figure each)."""
    dirs = set(application_dirs(config, rows, "compress"))
    return list(dict.fromkeys(row.network for row in rows if row.dir in dirs))


def fit_metrics(rows: list[Row]) -> list[str]:
    return sorted({f"{fit_dir}/metrics.json" for row in rows for fit_dir in row.fit_dirs})


def original_dir(preset: str, net: str, orig: str) -> str:
    return f"{results_dir(preset)}/{net}/{ORIGINAL_DIR.format(orig=orig)}"


def original_metrics(preset: str, rows: list[Row]) -> list[str]:
    """metrics.json of each original network the fits use."""
    return sorted({f"{original_dir(preset, row.network, row.original)}/metrics.json" for row in rows})


def manifest(config: Tree, rows: list[Row]) -> Manifest:
    preset, networks = config["name"], []
    for net in config["networks"]:
        originals = sorted({row.original for row in rows if row.network == net["name"]})
        networks.append(ManifestNetwork(net["name"], net["task"], model_name(net), net.get("published"),
                                        {orig: original_dir(preset, net["name"], orig) for orig in originals}))
    return Manifest(preset, config.get("description", ""), networks, rows)


def write_manifest(path: str | Path, data: dict[str, Any]) -> None:
    """Atomically, so an interrupted write never leaves half a manifest behind."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


def application_dirs(config: Tree, rows: list[Row], stage: str | None = None) -> list[str]:
    """The fits meta-compression and weight importance run on: `applications: all`, every distinct fit of the
    tables, each seed's; `reference`, each network's reference fit only; `none`, no fit; or one of those per stage
    (`applications: {compress: all, importance: none}`, a stage left out: all)."""
    choice = config.get("applications", "all")
    if isinstance(choice, dict):
        choice = choice.get(stage, "all")
    if choice == "none":
        return []
    if choice == "reference":
        return sorted({reference_fit(config["name"], net).dir for net in config["networks"]})
    return sorted({fit_dir for row in rows for fit_dir in row.fit_dirs})


# -- the overrides each job runs with ------------------------------------------------------------------------


def yaml_scalar(value: Any) -> str:
    """A value as the CLI's `--set key=value` parses it back (a YAML scalar or flow list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True).strip()
    return str(value)


def set_items(trees: list[NamedTree]) -> list[str]:
    """`key=value` of the merged trees, later trees winning, sorted: the YAML's key order (which params
    change detection would see) must not rerun anything."""
    merged: Tree = {}
    for _, tree in trees:
        merged.update(flatten(tree))
    return [f"{key}={yaml_scalar(value)}" for key, value in sorted(merged.items())]


def set_args(trees: list[NamedTree]) -> str:
    return " ".join(f"--set {shlex.quote(item)}" for item in set_items(trees))


def tag_args(**tags: Any) -> str:
    return " ".join(f"--tag {shlex.quote(f'{key}={value}')}" for key, value in tags.items())


def fit_trees(net: Tree, fit: Fit) -> list[NamedTree]:
    """A fit's result-changing overrides over its fit recipe file, in merge order. Threads, device and progress
    bars are set in the shell command, so a different --cores or device does not rerun finished fits."""
    name = f"networks[{net['name']}]"
    trees = [(f"{name}.data", {"data": net["data"]}), (f"{name}.fit", net.get("fit") or {}),
             (f"{name}.fit_per_recipe.{fit.fit_recipe}", (net.get("fit_per_recipe") or {}).get(fit.fit_recipe) or {})]
    if fit.stage == "ablation":
        trees.append(variant_set(net, fit.variant))
    elif fit.stage == "data-free":
        trees.append((f"{name}.data_free", {"data_free": True}))
    trees.append(("the grid's predictor size", {"predictor.hidden": int(fit.hidden)}))
    return trees + ([("the grid's seed", {"seed": fit.seed})] if fit.seed else [])


def represent_trees(net: Tree) -> list[NamedTree]:
    """The represented layers a network's fits use, so its permutations cover the same layers."""
    fit = flatten(net.get("fit"))
    return [(f"networks[{net['name']}].fit", {k: v for k, v in fit.items() if k.startswith("represent.")})]


def original_trees(net: Tree, smoothness: str | None = None, start: str | None = None) -> list[NamedTree]:
    """An original network's pretrain (with `smoothness`, the factor id) or import overrides; a `finetune`
    original's training starts from `start`, its imported model (`finetune_start`)."""
    name, original = f"networks[{net['name']}]", net["original"]
    if original["source"] == "pretrain" and smoothness is None:
        raise NernError(f"{name} is pretrained; its originals are reg<factor>, not imported")
    if original["source"] == "import" and smoothness is not None:
        raise NernError(f"{name} imports its weights; it has no reg{smoothness} original")
    shared = [(f"{name}.model", {"model": net["model"]}), (f"{name}.data", {"data": net["data"]})]
    if smoothness is None:  # the import (of an imported or a fine-tuned network); `set` is the training's
        settings = (original.get("set") or {}) if original["source"] == "import" else {}
        weights = {"model.checkpoint": original["checkpoint"]}
        return [*shared, (f"{name}.original.set", settings), (f"{name}.original", weights)]
    last: Tree = {"smoothness": float(smoothness)}
    if original["source"] == "finetune":
        if start is None:
            raise NernError(f"{name} is fine-tuned from its imported weights; pass the imported model to start from")
        last["model.checkpoint"] = start
    return [*shared, (f"{name}.original.set", original.get("set") or {}), (f"{name}.original", last)]


def fit_tags(fit: Fit, task: str, rule: str, variant: str = "default") -> str:
    return tag_args(rule=rule, preset=fit.preset, network=fit.net, task=task, fit_preset=fit.fit_recipe,
                    original=fit.orig, permutation=fit.perm, hidden=fit.hidden, variant=variant, seed=fit.seed)


def fit_run_name(fit: Fit, variant: str = "") -> str:
    point = f"{fit.net}/{fit.point}"
    return shlex.quote(f"{variant}:{point}" if variant else point)


def stage_options(config: Tree, stage: str) -> str:
    """Options of an application stage from the preset's optional `<stage>:` section, as --kebab-case flags
    (lists comma-separated; `--flag=value`, so a value such as -38,-26 is not read as a flag); absent: the
    CLI's defaults."""
    args = []
    for key, value in (config.get(stage) or {}).items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args.append(shlex.quote(f"--{key.replace('_', '-')}={value}"))
    return " ".join(args)


# -- every job's settings, validated when the DAG is built ---------------------------------------------------


def repo_file(repo: str | Path, path: str) -> str:
    """Files the repository ships (fit recipes, published numbers): relative paths are relative to it."""
    return str(path) if os.path.isabs(path) else str(Path(repo) / path)


def fit_recipe_file(config: Tree, repo: str | Path, name: str) -> str:
    if name not in config["fit_recipes"]:
        raise NernError(f"fit recipe '{name}' is not in fit_recipes ({', '.join(config['fit_recipes'])})")
    return repo_file(repo, config["fit_recipes"][name])


def check_job(cls: type, base: Tree, trees: list[NamedTree], job: str, checked: set | None = None) -> None:
    """Each tree's keys and types alone first (so the error names the tree a typo is in; `checked` holds the
    trees already seen), then the merged settings the job will run with (over the fit recipe file's
    settings, `base`), range checks included."""
    checked = set() if checked is None else checked
    for source, tree in trees:
        items = set_items([(source, tree)])
        if (cls, *items) in checked:
            continue
        try:
            check_overrides(cls, items)
        except NernError as exc:
            raise NernError(f"{source}: {exc}") from None
        checked.add((cls, *items))
    try:
        load_config(cls, None, set_items(trees), base=base)
    except NernError as exc:
        raise NernError(f"{job}: {exc}") from None


def validate_jobs(config: Tree, repo: str | Path, rows: list[Row]) -> None:
    """The typed config of every fit, pretrain and import job the rows need, as the CLI will build it."""
    fits = {fit.dir: fit for row in rows for fit in row_fits(config["name"], row)}
    recipes: dict[str, Tree] = {}  # each fit recipe file read once (as load_config reads it)
    checked: set = set()
    for fit in fits.values():
        if fit.fit_recipe not in recipes:
            recipes[fit.fit_recipe] = read_yaml(fit_recipe_file(config, repo, fit.fit_recipe))
        check_job(FitConfig, recipes[fit.fit_recipe], fit_trees(network(config, fit.net), fit),
                  f"the {fit.stage} fit {fit.dir} (fit recipe '{fit.fit_recipe}')", checked)
    for net_name, orig in sorted({(row.network, row.original) for row in rows}):
        net = network(config, net_name)
        smoothness = None if orig == "imported" else orig.removeprefix("reg")
        trees = original_trees(net, smoothness, finetune_start(config["name"], net))
        check_job(PretrainConfig, {}, trees, f"the original {net_name}/{orig}", checked)
