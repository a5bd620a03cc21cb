"""Flan 2022 prompt formats: zero-/few-shot and options/no-options, drawn per example by ratio."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from flanpipe.core.registry import DatasetSpec, SourceSpec
from flanpipe.data.formats import FormatMix, render_train_formats
from flanpipe.data.templates import load_validated, render_shard, render_train

N = 2000


@pytest.fixture
def spec(tmp_path: Path) -> DatasetSpec:
    path = tmp_path / "toy.yaml"
    path.write_text(
        "templates:\n"
        '  - inputs: "Premise: {premise}\\nHypothesis: {hypothesis}\\nDoes it follow?\\n\\n{options_}"\n'
        '    targets: "{answer}"\n'
        '  - inputs: "{premise} Is it true that {hypothesis}? {options_}"\n'
        '    targets: "{answer}"\n',
        encoding="utf-8",
    )
    return DatasetSpec(
        name="toy_nli",
        cluster="nli",
        source=SourceSpec(type="local", path="unused/{split}.jsonl"),
        fields={"premise": "premise", "hypothesis": "hypothesis", "answer": "label"},
        metric="accuracy",
        templates=path,
        options=("yes", "no"),
    )


def frame(n: int = N) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "example_id": list(range(n)),
            "premise": [f"p{i}." for i in range(n)],
            "hypothesis": [f"h{i}" for i in range(n)],
            "answer": ["yes" if i % 3 else "no" for i in range(n)],
        }
    )


def test_defaults_are_flan_and_change_nothing(spec: DatasetSpec) -> None:
    chosen = load_validated(spec)
    assert FormatMix().is_flan
    assert (
        render_train_formats(frame(), spec, chosen, FormatMix())
        .collect()
        .equals(render_train(frame(), spec, chosen).collect())
    )


def test_options_share_is_drawn_per_example_and_deterministic(spec: DatasetSpec) -> None:
    chosen = load_validated(spec)
    flan = render_train(frame(), spec, chosen).collect()
    never = render_train_formats(frame(), spec, chosen, FormatMix(options=0.0)).collect()
    assert not never["inputs"].str.contains("OPTIONS:").any()
    assert never["targets"].equals(flan["targets"]) and never["options"].equals(flan["options"])
    half = render_train_formats(frame(), spec, chosen, FormatMix(options=0.5)).collect()
    shown = half["inputs"].str.contains("OPTIONS:\n- yes\n- no", literal=True)
    assert abs(shown.mean() - 0.5) < 0.05  # type: ignore[operator]
    # shown rows are exactly FLAN's rendering, hidden ones exactly the no-options one
    assert half.filter(shown)["inputs"].equals(flan.filter(shown)["inputs"])
    assert half.filter(~shown)["inputs"].equals(never.filter(~shown)["inputs"])
    again = render_train_formats(frame(), spec, chosen, FormatMix(options=0.5)).collect()
    assert again.equals(half)
    reseeded = render_train_formats(frame(), spec, chosen, FormatMix(options=0.5, seed=7)).collect()
    assert not reseeded["inputs"].equals(half["inputs"])
    # an example's format does not depend on which other rows are in the split
    subset = render_train_formats(frame().filter(pl.col("example_id") % 7 == 0), spec, chosen, FormatMix(options=0.5))
    joined = subset.collect().join(half, on="example_id", suffix="_all")
    assert (joined["inputs"] == joined["inputs_all"]).all()


def test_fewshot_share_prefixes_exemplars_in_the_rows_format(spec: DatasetSpec) -> None:
    chosen = load_validated(spec)
    mix = FormatMix(fewshot=0.3, shots=2, options=0.5)
    out = render_train_formats(frame(), spec, chosen, mix).collect()
    zero = render_train_formats(frame(), spec, chosen, FormatMix(options=0.5)).collect()
    few = out["inputs"] != zero["inputs"]
    assert abs(few.mean() - 0.3) < 0.05  # type: ignore[operator]
    for row, plain in zip(out.filter(few).iter_rows(named=True), zero.filter(few)["inputs"], strict=True):
        prefix = row["inputs"][: -len(plain)]
        assert row["inputs"].endswith(plain) and prefix.count("\n\n") >= 2
        # exemplars show options exactly when the row does
        assert ("OPTIONS:" in prefix) == ("OPTIONS:" in plain)
    exemplar_ids = set(frame().sort(pl.col("example_id").hash(0)).head(2).collect()["example_id"])
    assert not exemplar_ids & set(out.filter(few)["example_id"])  # never its own exemplar


def test_render_shard_takes_formats_and_refuses_jinja(spec: DatasetSpec, tmp_path: Path) -> None:
    canonical = tmp_path / "train.parquet"
    frame(200).collect().write_parquet(canonical)
    render_shard(spec, canonical, tmp_path / "s.parquet", formats=FormatMix(options=0.0))
    assert not pl.read_parquet(tmp_path / "s.parquet")["inputs"].str.contains("OPTIONS").any()
    jinja = tmp_path / "j.yaml"
    jinja.write_text('templates:\n  - kind: jinja\n    jinja: "{{ premise }} ||| {{ answer }}"\n', encoding="utf-8")
    j_spec = DatasetSpec(**{**spec.__dict__, "templates": jinja})
    with pytest.raises(ValueError, match=r"dataset 'toy_nli' \(.*j.yaml\): prompt formats need pattern templates"):
        render_shard(j_spec, canonical, tmp_path / "j.parquet", formats=FormatMix(fewshot=0.5))
    with pytest.raises(ValueError, match="formats.options must be a share"):
        FormatMix(options=1.5)


# --------------------------------------------------------------------------------------- options ablation


def options_config(tmp_path: Path) -> Path:
    """The embedded default plus Flan 2022's options ablation (always / never / mixed)."""
    import yaml

    from flanpipe.core.io import read_yaml

    raw = read_yaml(Path(__file__).resolve().parent.parent / "config" / "config.yaml")
    raw["ablations"] = {**(raw.get("ablations") or {}), "options": {"settings": ["always", "never", "mixed"]}}
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_options_ablation_plans_three_trainings_each_evaluated_both_ways(tmp_path: Path) -> None:
    from flanpipe.core.vocab import parse_shard_name, shard_options_share
    from flanpipe.plan.config import load_config
    from flanpipe.plan.experiments import plan_experiment

    config = load_config(options_config(tmp_path))
    plan = plan_experiment(config)
    evals = plan.ablations["options"]
    runs = sorted({e.run for e in evals})
    held = config["held_out"]
    assert runs == sorted(
        [f"heldout_{c}" for c in held] + [f"heldout_{c}__opts-{s}" for c in held for s in ("never", "mixed")]
    )
    assert {plan.runs[r].shard_variant for r in runs} == {"natural-all", "natural-all-opts0", "natural-all-opts50"}
    assert (
        parse_shard_name("natural-all-opts50") == ("natural", None) and shard_options_share("natural-all-opts50") == 0.5
    )
    assert shard_options_share("natural-all") is None
    for e in evals:  # classification datasets with and without options; the others once
        assert e.variant in ("natural", "natural-noopts")
        if e.variant == "natural-noopts":
            assert plan.registry[e.dataset].has_options
    per_run = {r: {e.variant for e in evals if e.run == r} for r in runs}
    assert all(v == {"natural", "natural-noopts"} for v in per_run.values())


def test_options_ablation_dry_run_renders_a_shard_per_share(tmp_path: Path) -> None:
    import re
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from dag import run_snakemake

    r = run_snakemake(tmp_path, options_config(tmp_path), "-n", "ablation_options", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    shards = set(re.findall(r"results/shards/\w+/train/(natural-all\S*)\.parquet", r.stdout))
    assert shards == {"natural-all", "natural-all-opts0", "natural-all-opts50"}


def test_options_ablation_summary_and_figure(tmp_path: Path) -> None:
    from flanpipe.report.figures import ablation_figure, save_figure
    from flanpipe.report.tables import summarize_ablation

    records = []
    for i, setting in enumerate(("always", "never", "mixed 50%")):
        for j, shown in enumerate(("options", "no options")):
            records.append(
                {
                    "run": f"r{i}",
                    "variant": "natural" if shown == "options" else "natural-noopts",
                    "dataset": "rte",
                    "held_out": "nli",
                    "role": "tuned",
                    "model": "tiny",
                    "metric": "accuracy",
                    "mean": 50.0 + 10 * i - 5 * j,
                    "std": 0.0,
                    "best_dev_test": 50.0,
                    "ablation_value": f"{setting}->{shown}",
                }
            )
    summary = summarize_ablation("options", records)
    assert [p["label"] for p in summary["points"]][:2] == ["always -> options", "always -> no options"]
    assert summary["points"][3]["held_out_average"] == 55.0  # never -> no options
    save_figure(ablation_figure(summary), tmp_path / "options.png")
    assert (tmp_path / "options.png").stat().st_size > 1000
