"""Report: summary / ablation numbers against hand-computed averages, Markdown rows, and figures.

Records are fake but consistent eval results (flanpipe.eval.evaluate's JSON + run/variant/held_out/role).
Every expected number is worked out in a comment next to it, so a failure says which average broke.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure

from flanpipe.report.figures import (
    HELD_OUT_AXIS,
    SCORE_AXIS,
    ablation_figure,
    summary_figure,
    write_ablation,
    write_report,
    write_summary,
)
from flanpipe.report.tables import (
    PAPER_REFERENCE,
    ablation_markdown,
    format_params,
    instruction_label,
    markdown,
    records_from_paths,
    slot_of,
    summarize_ablation,
    summarize_main,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(
    dataset: str,
    cluster: str,
    tests: list[float],
    *,
    best: int,
    best_test: float | None = None,
    role: str = "tuned",
    variant: str = "natural",
    run: str | None = None,
    metric: str = "accuracy",
    **extra: Any,
) -> dict[str, Any]:
    """One eval result with per-template test scores ``tests``; validation is highest for ``best``.

    mean/std are those of ``tests`` (what evaluate.summarize writes); ``best_test`` overrides the
    best-dev test score so a test can tell a passed-through number from a recomputed one.
    """
    per_template = [
        {
            "template_id": i,
            "validation": 90.0 if i == best else 10.0,
            "test": t,
            "n_validation": 50,
            "n_test": 50,
        }
        for i, t in enumerate(tests)
    ]
    return {
        "dataset": dataset,
        "cluster": cluster,
        "metric": metric,
        "n_templates": len(tests),
        "per_template": per_template,
        "mean": statistics.fmean(tests),
        "std": statistics.pstdev(tests),
        "best_dev_template": best,
        "best_dev_test": tests[best] if best_test is None else best_test,
        "examples_per_s": 100.0,
        "run": run or (f"heldout_{cluster}" if role == "tuned" else "base-tiny"),
        "variant": variant,
        "held_out": cluster,
        "role": role,
        "model": "tiny",
        "params": 1_000_000,
        **extra,
    }


def main_records() -> list[dict[str, Any]]:
    """Two held-out clusters: nli (2 datasets), sentiment (1 dataset); tuned, no-options, base 0/2-shot."""
    return [
        # nli_a tuned: tests 80, 40 -> mean 60, std 20; validation picks t1 -> best dev 40
        record("nli_a", "nli", [80.0, 40.0], best=1),
        # nli_b tuned: tests 30, 50 -> mean 40, std 10; best dev t1 -> 50
        record("nli_b", "nli", [30.0, 50.0], best=1),
        # sentiment_a tuned: tests 70, 70 -> mean 70, std 0; best dev t0 -> 70
        record("sentiment_a", "sentiment", [70.0, 70.0], best=0),
        # without the options block (nli_a only): tests 50, 30 -> mean 40; best dev t0 -> 50
        record("nli_a", "nli", [50.0, 30.0], best=0, variant="natural-noopts"),
        # base zero-shot: nli_a 30, nli_b 40, sentiment_a 50 (all templates equal)
        record("nli_a", "nli", [30.0, 30.0], best=0, role="base"),
        record("nli_b", "nli", [40.0, 40.0], best=0, role="base"),
        record("sentiment_a", "sentiment", [50.0, 50.0], best=0, role="base"),
        # base 2-shot, nli only: 45 and 35
        record("nli_a", "nli", [45.0, 45.0], best=0, role="base", variant="natural-2shot"),
        record("nli_b", "nli", [35.0, 35.0], best=0, role="base", variant="natural-2shot"),
    ]


# ---------------------------------------------------------------------------------------------------
# main summary


def test_slot_of_reads_role_options_and_shots() -> None:
    assert slot_of({"role": "tuned", "variant": "natural", "dataset": "d"}) == "tuned_zeroshot"
    assert slot_of({"role": "tuned", "variant": "dataset_name-noopts", "dataset": "d"}) == "tuned_zeroshot_noopts"
    assert slot_of({"role": "base", "variant": "natural-2shot", "dataset": "d"}) == "base_fewshot"
    assert slot_of({"role": "base", "variant": "natural-noopts-2shot", "dataset": "d"}) == "base_fewshot_noopts"
    with pytest.raises(ValueError, match="role"):
        slot_of({"role": "student", "variant": "natural", "dataset": "d"})


def test_summary_cluster_and_held_out_averages() -> None:
    s = summarize_main(main_records(), "exp")
    # no record here kept per-example scores, so no interval (mean_se None) is claimed
    assert s["slots"] == ["tuned_zeroshot", "tuned_zeroshot_noopts", "base_zeroshot", "base_fewshot"]
    nli, sent = s["clusters"]["nli"]["average"], s["clusters"]["sentiment"]["average"]
    # tuned, mean over templates: nli (60 + 40) / 2 = 50; sentiment 70; held out (50 + 70) / 2 = 60
    assert nli["tuned_zeroshot"] == {
        "mean": 50.0,
        "best_dev": 45.0,
        "n_datasets": 2,
        "mean_se": None,
        "mean_ci": None,
        "clean_mean": None,
        "clean_dropped": 0,
        "chance": None,
    }  # best dev (40 + 50) / 2 = 45
    assert sent["tuned_zeroshot"] == {
        "mean": 70.0,
        "best_dev": 70.0,
        "n_datasets": 1,
        "mean_se": None,
        "mean_ci": None,
        "clean_mean": None,
        "clean_dropped": 0,
        "chance": None,
    }
    assert s["held_out_average"]["tuned_zeroshot"] == {
        "mean": 60.0,
        "best_dev": 57.5,
        "n_clusters": 2,
        "mean_se": None,
        "mean_ci": None,
        "clean_mean": None,
        "chance": None,
    }  # (45+70)/2
    # no options: only nli_a -> nli 40 (1 of 2 datasets); sentiment has none; held out 40 over 1 cluster
    assert nli["tuned_zeroshot_noopts"] == {
        "mean": 40.0,
        "best_dev": 50.0,
        "n_datasets": 1,
        "mean_se": None,
        "mean_ci": None,
        "clean_mean": None,
        "clean_dropped": 0,
        "chance": None,
    }
    assert sent["tuned_zeroshot_noopts"]["n_datasets"] == 0 and sent["tuned_zeroshot_noopts"]["mean"] is None
    assert s["held_out_average"]["tuned_zeroshot_noopts"] == {
        "mean": 40.0,
        "best_dev": 50.0,
        "n_clusters": 1,
        "mean_se": None,
        "mean_ci": None,
        "clean_mean": None,
        "chance": None,
    }
    # base zero-shot: nli (30 + 40) / 2 = 35; sentiment 50; held out (35 + 50) / 2 = 42.5
    assert nli["base_zeroshot"]["mean"] == 35.0 and sent["base_zeroshot"]["mean"] == 50.0
    assert s["held_out_average"]["base_zeroshot"]["mean"] == 42.5
    # base 2-shot: nli (45 + 35) / 2 = 40, no sentiment -> held out 40 over 1 cluster
    assert nli["base_fewshot"]["mean"] == 40.0
    assert s["held_out_average"]["base_fewshot"] == {
        "mean": 40.0,
        "best_dev": 40.0,
        "n_clusters": 1,
        "mean_se": None,
        "mean_ci": None,
        "clean_mean": None,
        "chance": None,
    }


def test_summary_per_dataset_numbers_are_passed_through() -> None:
    s = summarize_main(main_records(), "exp")
    a = s["clusters"]["nli"]["datasets"]["nli_a"]
    assert a["metric"] == "accuracy" and a["cluster"] == "nli"
    tuned = a["slots"]["tuned_zeroshot"]
    assert [t["test"] for t in tuned["per_template"]] == [80.0, 40.0]
    assert (tuned["mean"], tuned["std"]) == (60.0, 20.0)  # mean (80+40)/2 = 60; std |80-60| = 20
    assert (tuned["best_dev_template"], tuned["best_dev_test"]) == (1, 40.0)
    assert (tuned["run"], tuned["variant"], tuned["shots"]) == ("heldout_nli", "natural", 0)
    assert a["slots"]["base_fewshot"]["shots"] == 2


def test_best_dev_is_never_recomputed_from_test() -> None:
    # The record claims best dev = template 1 with test 12.5, although template 0 has the best TEST
    # score (90) and template 1's listed test score is 40. The report must copy 12.5, not pick 90.
    recs = [record("d", "nli", [90.0, 40.0], best=1, best_test=12.5)]
    s = summarize_main(recs)
    x = s["clusters"]["nli"]["datasets"]["d"]["slots"]["tuned_zeroshot"]
    assert (x["best_dev_template"], x["best_dev_test"]) == (1, 12.5)
    assert s["clusters"]["nli"]["average"]["tuned_zeroshot"]["best_dev"] == 12.5
    assert s["held_out_average"]["tuned_zeroshot"]["best_dev"] == 12.5
    assert "| d | accuracy | 90.0 | 40.0 | 65.0 ± 25.0 | t1: 12.5 |" in markdown(s)


def test_summary_markdown_rows() -> None:
    md = markdown(summarize_main(main_records(), "config/x.yaml"), figure="summary.png")
    assert md.startswith("# config/x.yaml: zero-shot results on held-out clusters\n")
    assert "![held-out clusters: instruction-tuned vs untuned base](summary.png)" in md
    # held-out average table: mean (no interval without per-example scores), clean subset (no audit: –)
    assert "| instruction-tuned, zero-shot | 60.0 | – | 57.5 | 2 |" in md
    assert "| instruction-tuned, zero-shot, no options | 40.0 | – | 50.0 | 1 |" in md
    assert "| untuned base, zero-shot | 42.5 | – | 42.5 | 2 |" in md  # templates all equal: best dev = mean
    assert "| untuned base, 2-shot | 40.0 | – | 40.0 | 1 |" in md
    # per-template table (tuned): dataset, metric, t0, t1, mean ± std, best dev
    assert "## Held out: nli (model `heldout_nli`)" in md
    assert "| nli_a | accuracy | 80.0 | 40.0 | 60.0 ± 20.0 | t1: 40.0 |" in md
    assert "| nli_b | accuracy | 30.0 | 50.0 | 40.0 ± 10.0 | t1: 50.0 |" in md
    # comparison table: cells "mean ± std / best dev"; missing slot "–"
    assert "| nli_b | accuracy | 40.0 ± 10.0 / 50.0 | – | 40.0 ± 0.0 / 40.0 | 35.0 ± 0.0 / 35.0 |" in md, md
    assert "| **cluster average** |  | **50.0 / 45.0** | **40.0 / 50.0** (1 of 2 datasets) |" in md


def test_base_zero_shot_best_dev_average() -> None:
    # base zero-shot best dev: nli (30 + 40) / 2 = 35, sentiment 50 -> held out (35 + 50) / 2 = 42.5
    s = summarize_main(main_records())
    assert s["held_out_average"]["base_zeroshot"]["best_dev"] == 42.5


def test_two_runs_in_one_cell_fail_loudly() -> None:
    recs = [record("d", "nli", [50.0], best=0), record("d", "nli", [60.0], best=0, run="heldout_nli__clusters3")]
    with pytest.raises(ValueError, match="heldout_nli__clusters3"):
        summarize_main(recs)
    # an exact repeat of the same run/variant/dataset is harmless
    assert summarize_main([recs[0], dict(recs[0])])["held_out_average"]["tuned_zeroshot"]["mean"] == 50.0


def _bar_heights(fig: Figure) -> list[float]:
    return [round(p.get_height(), 6) for p in fig.axes[0].patches]


def test_summary_figure_axes_and_bars() -> None:
    s = summarize_main(main_records(), "exp")
    fig = summary_figure(s, "config/x.yaml")
    ax = fig.axes[0]
    assert ax.get_ylabel() == SCORE_AXIS == "score (0-100, test split, mean over templates)"
    assert "held-out cluster" in ax.get_xlabel()
    assert ax.get_title().startswith("config/x.yaml\n") and "instruction-tuned vs untuned base" in ax.get_title()
    # groups: nli, sentiment, held-out average; series: tuned, base zero-shot, base few-shot (no-options
    # is in the tables only). Bars per series in group order: tuned 50, 70, 60; base 35, 50, 42.5;
    # few-shot 40, (none) 0, 40.
    assert _bar_heights(fig) == [50.0, 70.0, 60.0, 35.0, 50.0, 42.5, 40.0, 0.0, 40.0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["nli\n(2 datasets)", "sentiment\n(1 dataset)", "held-out average\n(2 clusters)"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "untuned base, 2-shot (mean over templates)" in legend
    assert "best-dev template (test score)" in legend


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000, len(data)  # a real plot with text and bars, not an empty canvas


def test_write_summary_outputs(tmp_path: Path) -> None:
    out = tmp_path / "results"
    s = write_summary(
        main_records(),
        out / "summary.json",
        out / "summary.md",
        out / "figures" / "summary.png",
        experiment="config/config.yaml",
        extra_markdown=["## Ablation: x\n\n| a |\n"],
    )
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    md = (out / "summary.md").read_text()
    assert "](figures/summary.png)" in md  # linked relative to summary.md
    assert md.rstrip().endswith("## Ablation: x\n\n| a |")
    _check_png(out / "figures" / "summary.png")
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temp files


def test_records_from_paths_and_write_report(tmp_path: Path) -> None:
    paths = []
    for r in main_records()[:3] + main_records()[4:5]:
        p = tmp_path / "eval" / r["run"] / r["variant"] / f"{r['dataset']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        bare = {k: v for k, v in r.items() if k not in ("run", "variant", "held_out", "role", "model", "params")}
        p.write_text(json.dumps(bare))
        paths.append(p)
    recs = records_from_paths(paths)
    assert [(r["run"], r["variant"], r["role"], r["held_out"]) for r in recs] == [
        ("heldout_nli", "natural", "tuned", "nli"),
        ("heldout_nli", "natural", "tuned", "nli"),
        ("heldout_sentiment", "natural", "tuned", "sentiment"),
        ("base-tiny", "natural", "base", "nli"),
    ]
    s = write_report(paths, tmp_path / "summary.json", tmp_path / "summary.md")
    assert s["held_out_average"]["tuned_zeroshot"]["mean"] == 60.0  # (50 + 70) / 2, as above
    _check_png(tmp_path / "summary.png")


# ---------------------------------------------------------------------------------------------------
# ablations


def clusters_records() -> list[dict[str, Any]]:
    """k = 1, 2 training clusters; held out nli (2 datasets) and commonsense (1 dataset)."""
    out = []
    # k=1: nli datasets 40, 50 -> nli 45; commonsense 35 -> held-out average (45 + 35) / 2 = 40
    # k=2: nli datasets 50, 60 -> nli 55; commonsense 45 -> held-out average (55 + 45) / 2 = 50
    for k, (a, b, c) in {1: (40.0, 50.0, 35.0), 2: (50.0, 60.0, 45.0)}.items():
        for ds, cl, y in (("nli_a", "nli", a), ("nli_b", "nli", b), ("cs_a", "commonsense", c)):
            run = f"heldout_{cl}__clusters{k}"
            # two templates y-10, y+10: mean y; best dev t1 -> y + 10
            out.append(record(ds, cl, [y - 10, y + 10], best=1, run=run, ablation_value=k))
    return out


def test_clusters_ablation_numbers_and_table(tmp_path: Path) -> None:
    a = summarize_ablation("clusters", clusters_records(), "exp")
    by_k = {p["value"]: p for p in a["points"]}
    assert list(by_k) == [1, 2]
    assert by_k[1]["held_out_average"] == 40.0 and by_k[2]["held_out_average"] == 50.0
    # best dev is +10 everywhere: 50 and 60
    assert by_k[1]["held_out_average_best_dev"] == 50.0 and by_k[2]["held_out_average_best_dev"] == 60.0
    assert by_k[1]["clusters"]["nli"]["average"] == 45.0 and by_k[1]["clusters"]["commonsense"]["average"] == 35.0
    assert by_k[1]["paper"] == PAPER_REFERENCE["clusters"][1] == 49.9
    md = ablation_markdown(a)
    assert "| training clusters | commonsense | nli | held-out average | best dev template | paper (137B) |" in md
    assert "| 1 | 35.0 | 45.0 | **40.0** | 50.0 | 49.9 |" in md
    assert "| 2 | 45.0 | 55.0 | **50.0** | 60.0 | 55.0 |" in md
    fig = ablation_figure(a)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "number of clusters used for instruction tuning"
    assert ax.get_ylabel() == HELD_OUT_AXIS
    assert ax.get_title() == "exp\nheld-out average vs number of instruction-tuning clusters"
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert lines["held-out average (this run)"] == [40.0, 50.0]
    assert lines["held out: nli"] == [45.0, 55.0]
    assert lines["paper, LaMDA-PT 137B (shape reference)"] == [49.9, 55.0]
    assert [t for t in ax.get_xticks()] == [1, 2]


def scale_records() -> list[dict[str, Any]]:
    """Two sizes, tuned and base, one held-out cluster with one dataset."""
    out = []
    # 422M: tuned 30, base 40 (tuning hurts small models); 137B: tuned 70, base 50
    for params, stem, tuned, base in ((422_000_000, "lamda_pt_422m", 30.0, 40.0), (137_000_000_000, "big", 70.0, 50.0)):
        kw = {"ablation_value": params, "model": stem, "params": params}
        out.append(record("nli_a", "nli", [tuned], best=0, run=f"heldout_nli__{stem}", **kw))
        out.append(record("nli_a", "nli", [base], best=0, role="base", run=f"base-{stem}", **kw))
    return out


def test_scale_ablation_tuned_vs_base() -> None:
    a = summarize_ablation("scale", scale_records(), "exp")
    got = [(p["role"], p["value"], p["held_out_average"], p["label"]) for p in a["points"]]
    assert got == [
        ("tuned", 422_000_000, 30.0, "422M (lamda_pt_422m)"),
        ("tuned", 137_000_000_000, 70.0, "137B (big)"),
        ("base", 422_000_000, 40.0, "422M (lamda_pt_422m)"),
        ("base", 137_000_000_000, 50.0, "137B (big)"),
    ]
    md = ablation_markdown(a)
    assert "| 422M (lamda_pt_422m) | untuned base | 40.0 | **40.0** | 40.0 |" in md
    ax = ablation_figure(a).axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "model size (parameters, log scale)"
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert lines["instruction-tuned (zero-shot)"] == ([422_000_000, 137_000_000_000], [30.0, 70.0])
    assert lines["untuned base (zero-shot)"] == ([422_000_000, 137_000_000_000], [40.0, 50.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["422M", "137B"]


def test_instructions_ablation_keeps_config_order_and_paper_names() -> None:
    settings = [("natural -> natural", 50.0), ("no_template->natural", 30.0), ("dataset_name->dataset_name", 41.0)]
    recs = [record("nli_a", "nli", [y], best=0, run=f"r{i}", ablation_value=v) for i, (v, y) in enumerate(settings)]
    a = summarize_ablation("instructions", recs, "exp")
    assert [(p["value"], p["label"], p["held_out_average"], p["paper"]) for p in a["points"]] == [
        ("natural->natural", "FLAN (natural->natural)", 50.0, 55.2),
        ("no_template->natural", "no template", 30.0, 37.3),
        ("dataset_name->dataset_name", "dataset name -> dataset name", 41.0, 47.0),
    ]
    ax = ablation_figure(a).axes[0]
    assert ax.get_xlabel() == "instruction setting (fine-tuning -> evaluation)"
    assert _bar_heights(ax.figure) == [50.0, 30.0, 41.0]
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "FLAN\n(natural->natural)"


def test_templates_ablation_sorted_counts(tmp_path: Path) -> None:
    # given out of order: k=4 -> 48, k=1 -> 42 (mean of [40, 44]); sorted by k on output
    recs = [
        record("nli_a", "nli", [48.0], best=0, run="t4", ablation_value=4),
        record("nli_a", "nli", [40.0, 44.0], best=0, run="t1", ablation_value="1"),
    ]
    table = write_ablation("templates", recs, tmp_path / "t.json", tmp_path / "t.png", experiment="exp")
    data = json.loads((tmp_path / "t.json").read_text())
    assert [(p["value"], p["held_out_average"], p["held_out_average_best_dev"]) for p in data["points"]] == [
        (1, 42.0, 40.0),  # best dev t0 -> 40, passed through
        (4, 48.0, 48.0),
    ]
    assert table.startswith("## Ablation: templates (exp)\n")
    assert "| 1 | 42.0 | **42.0** | 40.0 |" in table
    _check_png(tmp_path / "t.png")
    assert ablation_figure(summarize_ablation("templates", recs)).axes[0].get_xlabel().startswith("number of")


def test_every_ablation_writes_a_png(tmp_path: Path) -> None:
    cases = {
        "clusters": clusters_records(),
        "scale": scale_records(),
        "instructions": [record("d", "nli", [40.0], best=0, ablation_value="natural->natural")],
        "templates": [record("d", "nli", [40.0], best=0, ablation_value=1)],
    }
    for name, recs in cases.items():
        write_ablation(name, recs, tmp_path / f"{name}.json", tmp_path / f"{name}.png")
        _check_png(tmp_path / f"{name}.png")
    with pytest.raises(ValueError, match="unknown ablation"):
        summarize_ablation("tasks", [])


def test_labels() -> None:
    assert [format_params(n) for n in (422e6, 2e9, 137e9, 1_200_000, 999)] == ["422M", "2B", "137B", "1.2M", "999"]
    assert instruction_label("dataset_name->natural") == "dataset name -> natural"
    assert instruction_label("no_template->no_template") == "no template -> no template"


def test_report_tables_never_import_figures() -> None:
    """Tables and labels stand alone; only flanpipe.report.figures imports both (and matplotlib)."""
    import subprocess
    import sys

    code = "import sys, flanpipe.report.tables; assert not {'flanpipe.report.figures', 'matplotlib'} & set(sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_table_cells_carry_the_bootstrap_interval_of_the_mean() -> None:
    """With per-example scores (0/100 accuracy: 4 test examples x 2 templates) the cell shows the seeded
    95% interval flanpipe.report.stats gives for the mean over templates; one without them stays as it was."""
    from flanpipe.report.stats import dataset_rng, mean_over_templates_replicates, percentile_interval, score_matrix

    rows = [(s, t, e, 100.0 if (e + t) % 3 else 0.0) for s in ("validation", "test") for t in (0, 1) for e in range(4)]
    per_example = {k: [r[i] for r in rows] for i, k in enumerate(("split", "template_id", "example_id", "score"))}
    with_ci = record("nli_a", "nli", [50.0, 75.0], best=1, per_example=per_example)  # as the scores give
    reps = mean_over_templates_replicates(score_matrix(with_ci, "test"), 2000, dataset_rng(0, "nli_a"))
    want = dict(zip(("lo", "hi"), percentile_interval(reps), strict=True))
    assert want["lo"] < 62.5 < want["hi"]  # the estimate (75 + 50) / 2 lies inside
    md = markdown(summarize_main([with_ci, record("nli_b", "nli", [30.0, 50.0], best=1)]))
    assert f"| nli_a | accuracy | 62.5 ± 12.5 [{want['lo']:.1f}, {want['hi']:.1f}] / 75.0 |" in md, md
    assert "| nli_b | accuracy | 40.0 ± 10.0 / 50.0 |" in md


def test_summary_figure_error_bars_from_per_example_scores() -> None:
    """Error bars appear (1.96 x the average's standard error) only where per-example scores exist."""
    from flanpipe.report.stats import dataset_rng, mean_over_templates_replicates, score_matrix
    from flanpipe.report.tables import average_se

    rows = [(s, t, e, 100.0 if (e + t) % 3 else 0.0) for s in ("validation", "test") for t in (0, 1) for e in range(4)]
    per_example = {k: [r[i] for r in rows] for i, k in enumerate(("split", "template_id", "example_id", "score"))}
    recs = [record("nli_a", "nli", [50.0, 75.0], best=1, per_example=per_example)]
    s = summarize_main(recs, "exp")
    se = mean_over_templates_replicates(score_matrix(recs[0], "test"), 2000, dataset_rng(0, "nli_a")).std(ddof=1)
    assert s["clusters"]["nli"]["average"]["tuned_zeroshot"]["mean_se"] == pytest.approx(se)
    assert average_se([3.0, 4.0]) == pytest.approx(2.5) and average_se([3.0, None]) is None
    ax = summary_figure(s, "exp").axes[0]
    (bars,) = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    segment = bars.lines[2][0].get_segments()[0]
    ci = s["clusters"]["nli"]["average"]["tuned_zeroshot"]["mean_ci"]  # the table's bootstrap interval
    assert (segment[0][1], segment[1][1]) == pytest.approx((ci["lo"], ci["hi"]))
    assert "95% bootstrap interval of the mean" in [t.get_text() for t in ax.get_legend().get_texts()]
    plain = summary_figure(summarize_main(main_records(), "exp"), "exp").axes[0]
    assert not [c for c in plain.containers if type(c).__name__ == "ErrorbarContainer"]


def test_chance_level_averages_and_figure_line() -> None:
    """Chance (the eval JSON's, 100 / options) averages like the scores and is drawn as a dashed line per group."""
    recs = [
        record("nli_a", "nli", [60.0, 40.0], best=0, chance=50.0),
        record("nli_b", "nli", [60.0, 40.0], best=0, chance=100 / 3),
        record("sentiment_a", "sentiment", [70.0, 70.0], best=0, chance=50.0),
    ]
    s = summarize_main(recs, "exp")
    assert s["clusters"]["nli"]["average"]["tuned_zeroshot"]["chance"] == pytest.approx((50 + 100 / 3) / 2)
    assert s["held_out_average"]["tuned_zeroshot"]["chance"] == pytest.approx(((50 + 100 / 3) / 2 + 50) / 2)
    ax = summary_figure(s, "exp").axes[0]
    dashed = sorted(ln.get_ydata()[0] for ln in ax.lines if ln.get_linestyle() == "--")
    assert dashed == pytest.approx(sorted([(50 + 100 / 3) / 2, 50.0, ((50 + 100 / 3) / 2 + 50) / 2]))
    assert "chance (random option)" in [t.get_text() for t in ax.get_legend().get_texts()]
    mixed = summarize_main([*recs[:1], record("nli_c", "nli", [10.0, 10.0], best=0)], "exp")  # a generative set
    assert mixed["clusters"]["nli"]["average"]["tuned_zeroshot"]["chance"] is None
