"""nern.tables: the paper's tables and figures from run outputs (synthetic runs; no training)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nern import tables
from nern.cli import build_parser, main
from nern.errors import NernError

PUBLISHED = {
    "networks": {
        "cifar10-resnet20": {
            "original_top1": 91.69,
            "nern_top1": {"crossfilter": {160: 91.16, 180: 91.50}},
            "size_ratio": {160: 0.43, 180: 0.53},
        }
    }
}


def _run(root: Path, name: str, top1: float, *, original: float = 90.0, params: int = 1000,
         ratio: float = 0.5, rmse: float = 0.01, agreement: float = 95.0) -> str:
    """A finished fit's directory: metrics.json and curves.csv as `nern fit` writes them."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    metrics = {"original_top1": original, "reconstructed_top1": top1, "predictor_params": params,
               "size_ratio": ratio, "rec_rmse": rmse, "iterations": 20, "agreement": agreement,
               "kl_to_original": (100.0 - agreement) / 1000}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "curves.csv").write_text(
        "iteration,eval_test_top1,loss\n1,,0.5\n10,50.0,0.2\n20,%s,0.1\n" % top1)
    return str(run_dir)


def _row(group: str, label: str, run_dir: str, *, perm: str = "crossfilter", hidden: int = 160,
         preset: str = "fast", published: str | None = "cifar10-resnet20", smoothness: float | None = 0.0,
         overrides: dict | None = None, network: str = "cifar10-resnet20") -> dict:
    return {"group": group, "label": label, "network": network, "task": "CIFAR-10", "arch": "resnet20",
            "published": published, "stage": "fit", "fit_preset": preset, "original": "reg0",
            "smoothness": smoothness, "permutation": perm, "hidden": hidden, "variant": "",
            "data_free": label == "data-free", "overrides": overrides or {}, "dir": run_dir}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    rows = [
        _row("main", "fast", _run(runs, "c160", 88.5), perm="crossfilter", hidden=160),
        _row("main", "fast", _run(runs, "n160", 80.25), perm="none", hidden=160),
        _row("main", "paper", _run(runs, "n160p", 70.0), perm="none", hidden=160, preset="paper"),
        _row("main", "fast", _run(runs, "c180", 89.0, ratio=0.6), perm="crossfilter", hidden=180),
        _row("regularisation", "0", str(runs / "n160"), perm="none"),
        _row("regularisation", "0.0001", _run(runs, "r1", 85.0, original=89.0), perm="none", smoothness=1e-4),
        _row("ablation_loss", "rec", _run(runs, "rec", 87.0), overrides={"loss.kd": 0, "loss.fmd": 0}),
        _row("ablation_loss", "rec+kd+fmd", str(runs / "c160")),
        _row("data_free", "task data", str(runs / "c160")),
        _row("data_free", "data-free", _run(runs, "free", 60.0, agreement=70.0)),
    ]
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"preset": "unit", "description": "", "rows": rows,
                                    "networks": [{"name": "cifar10-resnet20", "task": "CIFAR-10",
                                                  "arch": "resnet20", "published": "cifar10-resnet20"}]}))
    return path


@pytest.fixture
def published(tmp_path: Path) -> Path:
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(PUBLISHED))
    return path


def _rows(manifest: Path) -> pd.DataFrame:
    return tables.load_rows(tables.load_manifest(manifest))


def test_main_table_sorts_rows_and_puts_published_numbers_beside_ours(manifest: Path, published: Path) -> None:
    table = tables.main_table(_rows(manifest), tables.load_published(published))
    assert list(table["permutation"]) == ["none", "none", "crossfilter", "crossfilter"]
    assert list(table["fit preset"]) == ["fast", "paper", "fast", "fast"]
    assert list(table["top-1"]) == [80.25, 70.0, 88.5, 89.0]
    assert table["Δ top-1"].iloc[2] == pytest.approx(-1.5)
    assert table["paper original top-1"].iloc[0] == 91.69
    assert pd.isna(table["paper top-1"].iloc[0])  # the paper has no "none" row at h=160
    assert list(table["paper top-1"].iloc[2:]) == [91.16, 91.50]
    assert pd.isna(table["paper Δ top-1"].iloc[0])
    assert list(table["paper Δ top-1"].iloc[2:]) == pytest.approx([91.16 - 91.69, 91.50 - 91.69])
    assert tables.format_cell("paper Δ top-1", -0.53) == "-0.53" and tables.format_cell("Δ top-1", 0.5) == "+0.50"
    assert list(table["paper size ratio"].iloc[2:]) == [0.43, 0.53]


def test_main_table_has_no_paper_columns_without_published_numbers(manifest: Path) -> None:
    rows = _rows(manifest).assign(published=None)
    assert not any(c.startswith("paper") for c in tables.main_table(rows, {}).columns)


def test_ablation_table_shows_the_varied_settings(manifest: Path) -> None:
    resolved = {"loss.kd": 1e-4, "loss.fmd": 1e-4}
    table = tables.ablation_table(_rows(manifest), "ablation_loss",
                                  config_of=lambda d: {} if d.endswith("rec") else resolved)
    assert list(table["variant"]) == ["rec", "rec+kd+fmd"]
    assert list(table["loss.kd"]) == [0, 1e-4]
    assert list(table["top-1"]) == [87.0, 88.5]


def test_data_free_table_pairs_each_data_free_fit_with_its_task_data_fit(manifest: Path) -> None:
    table = tables.data_free_table(_rows(manifest))
    assert len(table) == 1
    assert table["top-1 (task data)"].iloc[0] == 88.5
    assert table["top-1 (data-free)"].iloc[0] == 60.0
    assert table["Δ data-free"].iloc[0] == pytest.approx(-28.5)


def test_regularisation_table_lists_each_factor(manifest: Path) -> None:
    table = tables.regularisation_table(_rows(manifest))
    assert list(table["smoothness"]) == [0.0, 1e-4]
    assert list(table["original top-1"]) == [90.0, 89.0]


def test_markdown_and_latex_format_and_escape() -> None:
    table = pd.DataFrame({"task": ["A_B & C"], "top-1": [91.234], "Δ top-1": [-0.5], "size ratio": [0.43219],
                          "predictor params": [142749], "rec RMSE": [None]})
    md = tables.to_markdown(table)
    assert "| A_B & C | 91.23 | -0.50 | 0.432 | 142,749 | – |" in md
    assert md.splitlines()[1] == "|---|---:|---:|---:|---:|---|"
    tex = tables.to_latex(table, "50% of it")
    assert r"A\_B \& C & 91.23 & -0.50 & 0.432 & 142,749 & -- \\" in tex
    assert r"\caption{50\% of it}" in tex and r"$\Delta$ top-1" in tex


def test_make_tables_writes_every_table_and_figure(manifest: Path, published: Path, tmp_path: Path) -> None:
    written = tables.make_tables(manifest, published, tmp_path / "tables", tmp_path / "figures")
    names = {p.name for p in written}
    for table in ("main", "regularisation", "ablation_loss", "data_free"):
        assert {f"{table}.csv", f"{table}.md", f"{table}.tex"} <= names
    assert {"accuracy_vs_size.png", "training_curves_cifar10-resnet20.png"} <= names
    for path in written:
        assert path.stat().st_size > 0
    assert (tmp_path / "figures" / "accuracy_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(tmp_path / "tables" / "main.csv")
    assert csv["top-1"].tolist() == [80.25, 70.0, 88.5, 89.0]


def _compressed(run_dir: str, nern: list[tuple[str, int, float]], original: list[tuple[str, int, float]]) -> None:
    """A compress job's table, as `nern compress` writes it: (precision, bytes, top1) per file."""
    rows = [{"label": f"{rep}-s0-{p}", "representation": rep, "sparsity": 0.0, "scope": "-", "finetune": "none",
             "precision": p, "bytes": b, "top1": t, "delta_top1": t - 90.0}
            for rep, files in (("nern", nern), ("original", original)) for p, b, t in files]
    (Path(run_dir) / "compress").mkdir()
    pd.DataFrame(rows).to_csv(Path(run_dir) / "compress" / "compression.csv", index=False)


def test_rate_distortion_has_each_seeds_files_under_its_own_fit_name(manifest: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(manifest.read_text())
    runs = tmp_path / "seeds"
    dirs = [_run(runs, f"s{i}", 88.0 + i) for i in range(2)]
    for i, run_dir in enumerate(dirs):
        _compressed(run_dir, [("nern fp16", 1000 + i, 88.0 + i)], [("original fp32", 4000, 90.0)])
    data["rows"].append({**_row("main", "fast", dirs[0], hidden=200), "seeds": [0, 1], "seed_dirs": dirs})
    manifest.write_text(yaml.safe_dump(data))
    rows = tables.rate_distortion_rows(tables.load_manifest(manifest))
    nern = rows[rows["representation"] != "original"]
    assert sorted(nern["fit"]) == ["fast/crossfilter/h200", "fast/crossfilter/h200-seed1"]
    assert sorted(nern["bytes"]) == [1000, 1001]


def test_rate_distortion_joins_every_compressed_fit_and_marks_the_front(manifest: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    original = [("fp32", 1000, 90.0), ("int8", 300, 89.5), ("nnc-26", 200, 89.0)]
    _compressed(str(runs / "c160"), [("fp16", 500, 88.0), ("int4", 150, 80.0)], original)
    _compressed(str(runs / "n160"), [("fp16", 400, 80.0), ("int4", 100, 70.0)], original)
    sweep = tables.rate_distortion_rows(tables.load_manifest(manifest))
    assert set(sweep["fit"]) == {"fast/crossfilter/h160", "fast/none/h160", "original"}
    assert (sweep["fit"] == "original").sum() == 3  # the same original files in both jobs: once
    front = sweep[sweep["pareto"]].sort_values("bytes")
    assert front["bytes"].tolist() == [100, 150, 200, 300, 1000]  # fp16 files lose to int8 / NNCodec here
    written = tables.make_tables(manifest, None, tmp_path / "tables", tmp_path / "figures")
    names = {p.name for p in written}
    assert {"rate_distortion.csv", "rate_distortion.md", "rate_distortion_cifar10-resnet20.png"} <= names
    table = pd.read_csv(tmp_path / "tables" / "rate_distortion.csv")
    assert table["bytes"].is_monotonic_increasing and len(table) == 7


def test_no_compressed_fit_means_no_rate_distortion_table(manifest: Path, tmp_path: Path) -> None:
    written = tables.make_tables(manifest, None, tmp_path / "tables", tmp_path / "figures")
    assert not any("rate_distortion" in p.name for p in written)


def test_a_missing_run_is_a_user_error_naming_the_file(manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "runs" / "free" / "metrics.json").unlink()
    with pytest.raises(NernError, match=r"free/metrics.json not found"):
        tables.make_tables(manifest, None, tmp_path / "t", tmp_path / "f")


def test_cli_registers_the_tables_stage(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "tables" in build_parser().format_help()
    assert main(["tables", "--manifest", str(manifest), "--tables", str(tmp_path / "t"),
                 "--figures", str(tmp_path / "f")]) == 0
    assert (tmp_path / "t" / "main.md").is_file()
    assert main(["tables", "--manifest", str(tmp_path / "nope.yaml"), "--tables", "t", "--figures", "f"]) == 2
    assert "nern tables: error: manifest" in capsys.readouterr().err


def test_a_manifest_row_without_a_key_of_the_schema_is_a_user_error_naming_it(manifest: Path) -> None:
    data = yaml.safe_load(manifest.read_text())
    del data["rows"][2]["permutation"]
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(NernError, match=r"rows\[2\] has no 'permutation'"):
        tables.load_manifest(manifest)


def test_counts_whose_name_holds_the_letters_ratio_stay_counts() -> None:
    assert tables.format_cell("size ratio", 0.4321) == "0.432"
    assert tables.format_cell("ratio vs original fp32", 12.0) == "12.000"
    assert tables.format_cell("distillation iterations", 1500) == "1500"


def test_every_fit_table_shows_agreement_and_kl_beside_delta_top1(manifest: Path) -> None:
    built = tables.build_tables(_rows(manifest), {})
    for name in ("main", "regularisation", "ablation_loss"):
        columns = list(built[name].columns)
        assert columns.index("agreement") == columns.index("Δ top-1") + 1, name
        assert columns.index("KL to original") == columns.index("agreement") + 1, name
    assert built["main"]["agreement"].tolist() == [95.0] * 4
    free = built["data_free"].iloc[0]
    assert (free["agreement (task data)"], free["agreement (data-free)"]) == (95.0, 70.0)
    assert tables.format_cell("agreement", 97.591) == "97.59" and tables.format_cell("KL to original", 0.00612) == "0.0061"


def test_a_row_over_several_seeds_shows_their_mean_sd_and_count(manifest: Path, tmp_path: Path) -> None:
    """Seeds 0-2 of one point: the table's top-1 and agreement are their means, Δ top-1 is the mean's, and the
    seeds, top-1 sd and agreement sd columns appear (one-seed rows: sd empty)."""
    data = yaml.safe_load(manifest.read_text())
    runs = tmp_path / "seeds"
    dirs = [_run(runs, f"s{i}", top1, agreement=agreement) for i, (top1, agreement)
            in enumerate([(88.0, 96.0), (89.0, 97.0), (90.5, 95.5)])]
    row = _row("main", "fast", dirs[0], perm="crossfilter", hidden=200)
    data["rows"].append({**row, "seeds": [0, 1, 2], "seed_dirs": dirs})
    manifest.write_text(yaml.safe_dump(data))
    main = tables.build_tables(_rows(manifest), {})["main"]
    seeded = main[main["h"] == 200].iloc[0]
    assert seeded["seeds"] == 3 and seeded["top-1"] == pytest.approx(89.1666667)
    assert seeded["Δ top-1"] == pytest.approx(89.1666667 - 90.0)
    assert seeded["top-1 sd"] == pytest.approx(statistics.stdev([88.0, 89.0, 90.5]))
    assert seeded["agreement"] == pytest.approx(96.1666667)
    assert seeded["agreement sd"] == pytest.approx(statistics.stdev([96.0, 97.0, 95.5]))
    single = main[main["h"] == 180].iloc[0]
    assert single["seeds"] == 1 and pd.isna(single["top-1 sd"])


def test_rows_of_one_seed_each_have_no_seed_columns(manifest: Path) -> None:
    assert "seeds" not in tables.build_tables(_rows(manifest), {})["main"].columns
