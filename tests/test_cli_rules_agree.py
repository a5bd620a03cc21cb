"""The CLI and the rules call the same plan functions, so a step run by hand is the step the DAG runs."""

from __future__ import annotations

from pathlib import Path

from dag import ROOT, run_snakemake

from flanpipe.cli import pack_model_config
from flanpipe.core.io import resolve_config_path
from flanpipe.plan.config import load_config
from flanpipe.plan.experiments import plan_experiment

CONFIG = ROOT / "config" / "config.yaml"


def _rule_inputs(output: str, rule: str, workdir: Path) -> list[str]:
    """The inputs snakemake resolves for the job of ``rule`` that makes ``output`` (a dry run)."""
    r = run_snakemake(workdir, CONFIG, "-n", "--cores", "1", output, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = lines.index(f"rule {rule}:")
    line = next(x for x in lines[start:] if x.strip().startswith("input:"))
    return [s.strip() for s in line.split(":", 1)[1].split(",")]


def test_pack_uses_the_runs_own_model_for_a_scale_ablation_run(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    plan = plan_experiment(cfg)
    run = next(n for n, r in plan.runs.items() if r.model != cfg["model"] and r.kind == "tune")  # heldout_*__micro
    mixture = f"results/mixtures/{run}/mixture.parquet"
    by_hand = pack_model_config(cfg, mixture)
    assert by_hand == pack_model_config(cfg, "elsewhere/m.parquet", run) == plan.run_model_config(run)
    assert by_hand != resolve_config_path(cfg["model"])  # the drift this guards against
    model_input = _rule_inputs(f"results/packed/{run}", "pack", tmp_path)[-1]
    assert (ROOT / model_input).resolve() == (ROOT / by_hand).resolve()


def test_mix_and_train_spec_by_hand_are_the_rules(tmp_path: Path) -> None:
    """`flanpipe mix` / `train-spec` read the same Plan methods as rules mix / train_spec."""
    cfg = load_config(CONFIG)
    plan = plan_experiment(cfg)
    run = "heldout_nli__templates2"
    shards = _rule_inputs(f"results/mixtures/{run}/mixture.parquet", "mix", tmp_path)
    assert sorted(shards) == sorted(plan.run_shards(run).values())
    assert all(s.endswith("/train/natural-2.parquet") for s in shards)
    assert plan.train_spec(run)["model"]["num_layers"] > 0
