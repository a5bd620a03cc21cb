"""What a plan will cost before it is submitted: GPU-hours of the train and evaluate jobs Snakemake would run now.

``snakemake --summary`` lists every output of the DAG with its rule and whether it is pending ("update
pending"); the pending outputs of rules train and evaluate are the jobs an edit would launch. Each is priced
with flanpipe.train.planner at the run's layout (TP x PP from the config, DP from the job's GPUs):

    train:    planner.evaluate_layout -> hours for the run's steps at global batch x lengths.pack tokens per
              step; GPU-hours = hours x GPUs. A run that resumes pays only its remaining steps: an upper bound.
    evaluate: planner.forward_hours over an upper bound of the tokens the job scores: for each of its
              datasets, 2 splits x eval.examples x the templates that do the task, each prompt at lengths.inputs
              tokens plus lengths.targets per option (options_field tasks: OPTIONS_FIELD_GUESS options).

So an edit that triggers retraining shows its price (`flanpipe cost`) before `snakemake --profile slurm`
submits it. Torch-free, like all planning.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPTIONS_FIELD_GUESS = 4
"""Options per example assumed for a dataset whose options come per example (``options_field``)."""


@dataclass(frozen=True)
class Job:
    """One pending job of a priced rule: the rule and the output directory naming it."""

    rule: str
    output: str


def pending_jobs(summary_tsv: str, rules: tuple[str, ...] = ("train", "evaluate")) -> list[Job]:
    """The jobs of ``rules`` that ``snakemake --summary`` marks "update pending" (one per output path)."""
    rows = csv.DictReader(io.StringIO(summary_tsv), delimiter="\t")
    if rows.fieldnames is None or not {"output_file", "rule", "plan"} <= set(rows.fieldnames):
        raise ValueError(f"not a `snakemake --summary` table (columns {rows.fieldnames}); got:\n{summary_tsv[:500]}")
    seen: dict[str, Job] = {}
    for row in rows:
        if row["rule"] in rules and row["plan"].strip() == "update pending":
            seen.setdefault(row["output_file"], Job(row["rule"], row["output_file"]))
    return list(seen.values())


@dataclass(frozen=True)
class Pricing:
    """The hardware a plan is priced on (planner.Hardware's facts) and each rule's GPUs per job."""

    train_gpus: int | None = None
    """GPUs of one training job (the profile's train tasks); None: TP x PP (the rule's default)."""
    eval_gpus: int | None = None
    """GPUs of one evaluation job (the profile's evaluate tasks); None: the evaluation TP x PP."""
    gpu_mem_gib: float = 80.0
    mfu: float = 0.4
    peak_tflops: float | None = None
    """None: the config's train.peak_tflops (the MFU denominator training logs against)."""


def train_cost(plan: Any, run: str, pricing: Pricing) -> dict[str, Any]:
    """One training job: planner.evaluate_layout at the config's TP x PP x VPP and the job's GPUs."""
    from flanpipe.model.hf_format import load_model_file
    from flanpipe.plan.config import micro_batch_for
    from flanpipe.train.planner import Hardware, Layout, Workload, evaluate_layout

    config = plan.config
    t, pack = config["train"], config["lengths"]["pack"]
    tp, pp = t["tensor_model_parallel_size"], t["pipeline_model_parallel_size"]
    vpp = t.get("virtual_pipeline_model_parallel_size", 1)
    gpus = pricing.train_gpus or tp * pp
    dp = max(1, gpus // (tp * pp))
    micro = t["micro_batch_size"] or micro_batch_for(t["global_batch_size"], dp, t.get("max_micro_batch_size", 8))
    steps = plan.runs[run].steps or t["steps"]
    hw = Hardware(
        gpus=gpus,
        gpu_mem_gib=pricing.gpu_mem_gib,
        peak_tflops=pricing.peak_tflops or t["peak_tflops"],
        mfu=pricing.mfu,
    )
    wl = Workload(batch_tokens=t["global_batch_size"] * pack, seq_length=pack, steps=steps)
    model = load_model_file(plan.run_model_config(run))
    c = evaluate_layout(model, hw, wl, Layout(tp, pp, dp, micro, "none", vpp))
    hours = c.get("total_hours")
    return {
        "rule": "train",
        "job": run,
        "gpus": gpus,
        "layout": f"TP{tp} PP{pp} DP{dp}" + (f" VPP{vpp}" if vpp > 1 else ""),
        "steps": steps,
        "hours": hours,
        "gpu_hours": None if hours is None else hours * gpus,
        "notes": c.get("reasons", []),
    }


def eval_tokens(plan: Any, datasets: list[str]) -> int:
    """Upper bound of the tokens one evaluation job runs forward (see the module docstring)."""
    config = plan.config
    n, lengths = config["eval"]["examples"], config["lengths"]
    total = 0
    for d in datasets:
        spec = plan.registry[d]
        templates = [t for t in plan.templates.get(d, []) if not t.turned_around] or [None]
        options = len(spec.options) if spec.options else (OPTIONS_FIELD_GUESS if spec.options_field else 1)
        total += 2 * n * len(templates) * (lengths["inputs"] + options * lengths["targets"])
    return total


def eval_cost(plan: Any, output: str, pricing: Pricing) -> dict[str, Any]:
    """One evaluation job (``results/eval_groups/<run>/<cluster>``, every variant): planner.forward_hours."""
    from flanpipe.eval.layout import eval_layout
    from flanpipe.model.hf_format import load_model_file
    from flanpipe.plan.eval_plan import planned_group_members
    from flanpipe.train.planner import forward_hours

    run, cluster = Path(output).parts[-2:]
    datasets = [d for _, d in planned_group_members(plan, run, cluster)]  # a dataset once per variant
    tp, pp = eval_layout(plan.config)
    gpus = pricing.eval_gpus or tp * pp
    tokens = eval_tokens(plan, datasets)
    seq = plan.config["lengths"]["inputs"] + plan.config["lengths"]["targets"]
    peak = pricing.peak_tflops or plan.config["train"]["peak_tflops"]
    model = load_model_file(plan.run_model_config(run))
    hours = forward_hours(model, tokens, seq, gpus, peak, pricing.mfu)
    return {
        "rule": "evaluate",
        "job": f"{run}/{cluster}",
        "gpus": gpus,
        "layout": f"TP{tp} PP{pp} DP{max(1, gpus // (tp * pp))}",
        "tokens": tokens,
        "hours": hours,
        "gpu_hours": hours * gpus,
        "notes": [],
    }


def profile_gpus(profile: str | Path | None) -> tuple[int | None, int | None]:
    """(train, evaluate) GPUs per job that a Snakemake profile's set-resources give (``gpu``, else ``tasks``),
    None where it gives none (then the rule's default: TP x PP)."""
    from flanpipe.core.io import read_yaml

    if profile is None:
        return None, None
    path = Path(profile) / "config.yaml" if Path(profile).is_dir() else Path(profile)
    resources = (read_yaml(path) or {}).get("set-resources") or {}

    def gpus(rule: str) -> int | None:
        r = resources.get(rule) or {}
        value = r.get("gpu", r.get("tasks"))
        return int(value) if value is not None else None

    return gpus("train"), gpus("evaluate")


def plan_cost(plan: Any, summary_tsv: str, pricing: Pricing = Pricing()) -> dict[str, Any]:
    """Every pending train and evaluate job priced, and the totals per rule."""
    rows = []
    for job in sorted(pending_jobs(summary_tsv), key=lambda j: (j.rule != "train", j.output)):
        if job.rule == "train":
            rows.append(train_cost(plan, Path(job.output).name, pricing))
        else:
            rows.append(eval_cost(plan, job.output, pricing))
    totals: dict[str, Any] = {}
    for rule in ("train", "evaluate"):
        mine = [r for r in rows if r["rule"] == rule]
        totals[rule] = {"jobs": len(mine), "gpu_hours": sum(r["gpu_hours"] or 0.0 for r in mine)}
    totals["gpu_hours"] = totals["train"]["gpu_hours"] + totals["evaluate"]["gpu_hours"]
    assumptions = {"mfu": pricing.mfu, "peak_tflops": pricing.peak_tflops or plan.config["train"]["peak_tflops"]}
    return {"jobs": rows, "totals": totals, "assumptions": assumptions}


def format_cost(cost: Mapping[str, Any]) -> str:
    """A table of the priced jobs and one total line."""
    width = max([48, *(len(r["rule"] + r["job"]) + 1 for r in cost["jobs"])])
    lines = [f"{'job':<{width}} {'GPUs':>5} {'layout':<14} {'hours':>10} {'GPU-hours':>10}"]
    for r in cost["jobs"]:
        hours = "n/a" if r["hours"] is None else f"{r['hours']:.3g}"
        gpu_h = "n/a" if r["gpu_hours"] is None else f"{r['gpu_hours']:.3g}"
        note = f"  ({'; '.join(r['notes'])})" if r["notes"] else ""
        job = f"{r['rule']} {r['job']}"
        lines.append(f"{job:<{width}} {r['gpus']:>5} {r['layout']:<14} {hours:>10} {gpu_h:>10}{note}")
    t, a = cost["totals"], cost["assumptions"]
    lines.append(
        f"total: {t['train']['jobs']} train jobs {t['train']['gpu_hours']:.3g} GPU-h + {t['evaluate']['jobs']} "
        f"evaluate jobs {t['evaluate']['gpu_hours']:.3g} GPU-h = {t['gpu_hours']:.3g} GPU-h "
        f"(at {a['peak_tflops']:g} TFLOP/s x MFU {a['mfu']:g}; flanpipe.train.planner)"
    )
    return "\n".join(lines)
