"""Report tables: the zero-shot results on held-out clusters (summary.json / summary.md) and the paper's
four ablations (one JSON each, plus a Markdown table for summary.md), with the labels figures reuse.
Drawing and writing the files (JSON, Markdown, PNG together) is flanpipe.report.figures, which imports this
module; this module never imports it.

Input is a list of *records*: one evaluation result (flanpipe.eval.evaluate's JSON: dataset, cluster,
metric, per_template, mean, std, best_dev_template, best_dev_test, ...) plus where it came from:
``run``, ``variant`` (an EvalVariant name such as ``natural-noopts`` or ``natural-2shot``),
``held_out`` (the cluster), ``role`` (``tuned`` | ``base``), ``model`` (config stem), ``params``, and
for ablations ``ablation_value``. The workflow builds them from the experiment plan; the report only
groups and averages, it never re-scores.

Averages follow the paper: a dataset's score is the mean over its templates (or the test score of
the template picked on validation, "best dev"), a cluster's score is the mean over its datasets,
and the "held-out average" is the mean over clusters. Mean, std and the best-dev score are copied
from the eval result, never recomputed here: the best template is chosen on the validation split,
and recomputing it from test numbers would silently overstate zero-shot performance.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flanpipe.core.io import read_json
from flanpipe.core.vocab import ABLATIONS, EvalVariant, RunRole, role_of_run_name
from flanpipe.report.stats import dataset_rng, mean_over_templates_replicates, percentile_interval, score_matrix
from flanpipe.report.uncertainty import excluded_ids

Record = Mapping[str, Any]

SCORE_NOTE = (
    "Scores are on the test split, 0-100 (accuracy, exact match, F1, BLEU or ROUGE as the dataset's metric). "
    "*mean* = mean over the dataset's templates; *best dev* = test score of the template with the best "
    "validation score. Cluster = mean over its datasets; held-out average = mean over clusters."
)

AVERAGE_BOOTSTRAP = 2_000
AVERAGE_NOTE = (
    "examples resampled with replacement within each dataset (stratified); a replicate of an average is "
    "the average of its datasets' (clusters') replicates"
)

# Slots are the comparisons the paper makes for each held-out dataset, in display order.
SLOT_ORDER = (
    "tuned_zeroshot",
    "tuned_zeroshot_noopts",
    "tuned_fewshot",
    "tuned_fewshot_noopts",
    "base_zeroshot",
    "base_zeroshot_noopts",
    "base_fewshot",
    "base_fewshot_noopts",
)

ABLATION_NAMES = ABLATIONS

# Held-out averages in the paper (LaMDA-PT 137B), to compare the *shape* of a small reproduction against.
# clusters: Figure 6 (held out NLI, commonsense, closed-book QA), 1..7 training clusters.
# instructions: Figure 8, average over four held-out clusters; keys are "train->eval" instruction modes.
PAPER_REFERENCE: dict[str, dict[Any, float]] = {
    "clusters": {1: 49.9, 2: 55.0, 3: 59.3, 4: 59.2, 5: 60.8, 6: 61.9, 7: 63.5},
    "instructions": {
        "natural->natural": 55.2,
        "no_template->natural": 37.3,
        "dataset_name->natural": 46.6,
        "dataset_name->dataset_name": 47.0,
    },
}

_INSTRUCTION_LABELS = {
    "natural->natural": "FLAN (natural->natural)",
    "no_template->natural": "no template",
    "dataset_name->natural": "dataset name -> natural",
    "dataset_name->dataset_name": "dataset name -> dataset name",
}


# ---------------------------------------------------------------------------------------------------
# small helpers


def _mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that exist: a dataset with no test examples has no score, not a score of 0."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def held_out_of(record: Record) -> str:
    """The held-out cluster a record belongs to; the dataset's own cluster when the record omits it."""
    return str(record.get("held_out") or record["cluster"])


def slot_of(record: Record) -> str:
    """Which comparison a record fills: role x zero/few-shot x with/without the options block.

    The instruction mode is deliberately not part of the slot: the main results use one eval mode
    (config templates.eval_mode), whatever it is called.
    """
    v = EvalVariant.parse(str(record["variant"]))
    role = str(record["role"])
    if role not in {r.value for r in RunRole}:
        raise ValueError(f"record {record.get('run')}/{record['variant']}/{record['dataset']}: role {role!r}")
    return f"{role}_{'fewshot' if v.shots else 'zeroshot'}" + ("" if v.options else "_noopts")


def slot_label(slot: str, shots: int | None = None) -> str:
    """Human name of a slot for tables and legends."""
    role, shot, *rest = slot.split("_")
    name = RunRole(role).label
    name += ", zero-shot" if shot == "zeroshot" else f", {shots}-shot" if shots else ", few-shot"
    return name + (", no options" if rest else "")


def format_params(n: int | float | None) -> str:
    """422_000_000 -> '422M', 137e9 -> '137B': the paper's way of naming model sizes."""
    if n is None:
        return "?"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(int(n))


def _key(record: Record) -> tuple[str, str, str]:
    return str(record.get("run")), str(record["variant"]), str(record["dataset"])


def average_replicates(parts: Sequence[Any]) -> Any:
    """Replicates of an unweighted average of independently resampled parts (a cluster's datasets, the
    held-out clusters): replicate b is the mean of the parts' replicate b, so the interval is the stratified
    bootstrap's. None when a part has none (an interval over part of an average would lie) or there are none."""
    if not parts or any(p is None for p in parts):
        return None
    return np.mean(np.stack(list(parts)), axis=0)


def mean_interval(replicates: Any) -> dict[str, float] | None:
    """95% interval (percentile) and standard error of the mean over templates from its bootstrap
    replicates (mean_replicates); None for a record written before per-example scores were kept. The
    same replicates feed the cluster and held-out averages, so a one-dataset cluster shows its dataset's
    interval."""
    if replicates is None:
        return None
    lo, hi = percentile_interval(replicates)
    return {"lo": lo, "hi": hi, "se": float(replicates.std(ddof=1))}


def _all_or_none(values: Sequence[float | None]) -> float | None:
    """Mean of values only when every one is known (a chance level over part of an average would mislead)."""
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def average_se(ses: Sequence[float | None]) -> float | None:
    """Standard error of an average of independent estimates (datasets' test sets, clusters' datasets):
    sqrt(sum se_i^2) / n; None when any part lacks one (an interval over part of the average would lie)."""
    if not ses or any(x is None for x in ses):
        return None
    return math.sqrt(sum(x * x for x in ses)) / len(ses)


def clean_subset(record: Record, audit: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Mean over templates on the clean test subset: the contaminated eval examples of the run's audit
    (flanpipe.data.contamination) left out, with how many were dropped. None without an audit of the run or
    without per-example scores; an audit that flags nothing gives the full score with 0 dropped."""
    if audit is None or not record.get("per_example"):
        return None
    dropped = excluded_ids(audit, str(record["dataset"])).get("test", [])
    full = score_matrix(record, "test")
    clean = score_matrix(record, "test", dropped)
    n_dropped = int(full.scores.shape[1] - clean.scores.shape[1])  # ids outside the test split drop nothing
    mean = float(clean.scores.mean()) if clean.scores.size else None
    return {"mean": mean, "n": int(clean.scores.shape[1]), "n_dropped": n_dropped}


def mean_replicates(record: Record, n_boot: int, seed: int) -> Any:
    """Bootstrap replicates of the mean over templates (stratified per dataset: flanpipe.report.stats.dataset_rng),
    averaged into the cluster and held-out intervals; None without per-example scores."""
    if not record.get("per_example"):
        return None
    rng = dataset_rng(seed, str(record["dataset"]))
    return mean_over_templates_replicates(score_matrix(record, "test"), n_boot, rng)


def _dataset_scores(record: Record, audit: Mapping[str, Any] | None = None, replicates: Any = None) -> dict[str, Any]:
    """The per-dataset numbers of one eval result, passed through unchanged, plus the mean's interval
    and (with the run's contamination audit) the clean-subset score."""
    v = EvalVariant.parse(str(record["variant"]))
    return {
        "run": record.get("run"),
        "variant": record["variant"],
        "model": record.get("model"),
        "params": record.get("params"),
        "shots": v.shots,
        "n_templates": record.get("n_templates", len(record.get("per_template", []))),
        "per_template": [dict(t) for t in record.get("per_template", [])],
        "mean": record.get("mean"),
        "std": record.get("std"),
        "median": record.get("median"),
        "best_dev_template": record.get("best_dev_template"),
        "best_dev_test": record.get("best_dev_test"),
        "mean_ci": mean_interval(replicates),
        "clean": clean_subset(record, audit),
        "chance": record.get("chance"),
    }


def _unique(records: Sequence[Record], key: Any, what: str) -> dict[Any, Record]:
    """Index records by ``key``; an exact repeat (same run/variant/dataset) is dropped, a conflict raises.

    Two different runs landing in one cell would make any average meaningless, so it fails loudly.
    """
    out: dict[Any, Record] = {}
    for r in records:
        k = key(r)
        if k in out and _key(out[k]) != _key(r):
            raise ValueError(f"{what}: both {'/'.join(_key(out[k]))} and {'/'.join(_key(r))} fill {k}")
        out.setdefault(k, r)
    return out


# ---------------------------------------------------------------------------------------------------
# main results: summary.json / summary.md


def summarize_main(
    records: Sequence[Record],
    experiment: str = "flanpipe",
    audits: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    published: Mapping[str, Mapping[str, Any]] | None = None,
    n_boot: int = AVERAGE_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Group eval records by held-out cluster, dataset and slot, and average them like the paper.

    ``audits``: run -> contamination audit (flanpipe.data.contamination), for the clean-subset scores.
    ``published``: dataset -> the paper's scores (registry ``published:``), carried beside ours.
    Cluster and held-out averages get a 95% interval from a bootstrap over examples stratified by
    dataset (``n_boot`` replicates, ``seed``; stated in the report).
    """
    audits = audits or {}
    cells = _unique(records, lambda r: (held_out_of(r), str(r["dataset"]), slot_of(r)), "summary")
    slots = [s for s in SLOT_ORDER if any(k[2] == s for k in cells)]
    clusters: dict[str, Any] = {}
    reps: dict[tuple[str, str], list[Any]] = {}
    for (cluster, dataset, slot), r in sorted(cells.items()):
        c = clusters.setdefault(cluster, {"datasets": {}})
        d = c["datasets"].setdefault(dataset, {"dataset": dataset, "cluster": r["cluster"], "metric": r["metric"]})
        if published and dataset in published:
            d["published"] = dict(published[dataset])
        rep = mean_replicates(r, n_boot, seed)
        d.setdefault("slots", {})[slot] = _dataset_scores(r, audits.get(str(r.get("run"))), rep)
        reps.setdefault((cluster, slot), []).append(rep)
    cluster_reps: dict[tuple[str, str], Any] = {}
    for cluster, c in clusters.items():
        c["average"] = {}
        for s in slots:
            cluster_reps[(cluster, s)] = average_replicates(reps.get((cluster, s), []))
            c["average"][s] = {
                **_slot_average(c["datasets"].values(), s),
                "mean_ci": mean_interval(cluster_reps[(cluster, s)]),
            }
    held_out_average = {}
    for s in slots:
        parts = [cluster_reps[(k, s)] for k, c in clusters.items() if c["average"][s]["n_datasets"]]
        held_out_average[s] = {
            "mean": _mean(c["average"][s]["mean"] for c in clusters.values()),
            "best_dev": _mean(c["average"][s]["best_dev"] for c in clusters.values()),
            "n_clusters": sum(c["average"][s]["n_datasets"] > 0 for c in clusters.values()),
            "mean_se": average_se(
                [c["average"][s]["mean_se"] for c in clusters.values() if c["average"][s]["n_datasets"]]
            ),
            "mean_ci": mean_interval(average_replicates(parts)),
            "clean_mean": _all_or_none(
                [c["average"][s]["clean_mean"] for c in clusters.values() if c["average"][s]["n_datasets"]]
            ),
            "chance": _all_or_none(
                [c["average"][s]["chance"] for c in clusters.values() if c["average"][s]["n_datasets"]]
            ),
        }
    return {
        "experiment": experiment,
        "score": SCORE_NOTE,
        "average_interval": {"n_boot": n_boot, "seed": seed, "level": 0.95, "resampling": AVERAGE_NOTE},
        "slots": slots,
        "clusters": clusters,
        "held_out_average": held_out_average,
    }


def _slot_average(datasets: Iterable[Mapping[str, Any]], slot: str) -> dict[str, Any]:
    """Cluster average of one slot over the datasets that have it (n_datasets says how many)."""
    have = [d["slots"][slot] for d in datasets if slot in d["slots"]]
    return {
        "mean": _mean(x["mean"] for x in have),
        "best_dev": _mean(x["best_dev_test"] for x in have),
        "n_datasets": len(have),
        "mean_se": average_se([(x.get("mean_ci") or {}).get("se") for x in have]),
        "clean_mean": _all_or_none([(x.get("clean") or {}).get("mean") for x in have]),
        "clean_dropped": sum((x.get("clean") or {}).get("n_dropped", 0) for x in have),
        "chance": _all_or_none([x.get("chance") for x in have]),
    }


def slot_shots(summary: Mapping[str, Any], slot: str) -> int | None:
    """Number of exemplars a few-shot slot used (read off its results), for labels like '2-shot'."""
    for c in summary["clusters"].values():
        for d in c["datasets"].values():
            if slot in d["slots"]:
                return int(d["slots"][slot]["shots"])
    return None


def _mean_std(x: Mapping[str, Any]) -> str:
    return f"{_fmt(x['mean'])} ± {_fmt(x['std'])}"


def _interval(x: Mapping[str, Any]) -> str:
    """' [lo, hi]' when the result carries the mean's bootstrap interval, else nothing."""
    ci = x.get("mean_ci")
    return "" if not ci else f" [{_fmt(ci['lo'])}, {_fmt(ci['hi'])}]"


def _clean(x: Mapping[str, Any]) -> str:
    """'; clean 41.0 (−3)': the clean-subset mean and how many contaminated test examples it left out."""
    c = x.get("clean")
    return "" if not c else f"; clean {_fmt(c['mean'])} (−{c['n_dropped']})"


def _cell(x: Mapping[str, Any] | None) -> str:
    """'mean ± std [95% interval] / best dev; clean mean (−dropped)' for one dataset in one slot."""
    return "–" if x is None else f"{_mean_std(x)}{_interval(x)} / {_fmt(x['best_dev_test'])}{_clean(x)}"


def _average_cell(a: Mapping[str, Any], n_datasets: int) -> str:
    """Bold 'mean / best dev'; '(k of n datasets)' when a slot is missing for some datasets."""
    partial = "" if a["n_datasets"] == n_datasets else f" ({a['n_datasets']} of {n_datasets} datasets)"
    clean = "" if a.get("clean_mean") is None else f"; clean {_fmt(a['clean_mean'])} (−{a['clean_dropped']})"
    return f"**{_fmt(a['mean'])}{_interval(a)} / {_fmt(a['best_dev'])}**{clean}{partial}"


def markdown(summary: Mapping[str, Any], figure: str | None = None, extra: Sequence[str] = ()) -> str:
    """summary.md: held-out averages first, then per cluster the per-template and comparison tables."""
    slots = list(summary["slots"])
    labels = {s: slot_label(s, slot_shots(summary, s)) for s in slots}
    lines = [f"# {summary['experiment']}: zero-shot results on held-out clusters", "", summary["score"], ""]
    if figure:
        lines += [f"![held-out clusters: instruction-tuned vs untuned base]({figure})", ""]
    lines += ["## Held-out average", ""]
    rows = [
        [
            labels[s],
            _fmt(a["mean"]) + _interval(a),
            _fmt(a.get("clean_mean")),
            _fmt(a["best_dev"]),
            str(a["n_clusters"]),
        ]
        for s, a in summary["held_out_average"].items()
    ]
    head = ["model / prompt", "mean over templates [95% interval]", "clean subset", "best dev template", "clusters"]
    lines += [*_md_table(head, rows), ""]
    ai = summary.get("average_interval")
    if ai:
        lines += [
            f"Intervals on averages: 95% bootstrap, {ai['n_boot']} replicates, seed {ai['seed']}; "
            f"{ai['resampling']}. *clean subset*: contaminated eval examples of the run's audit left out "
            "(– without an audit).",
            "",
        ]
    for cluster, c in summary["clusters"].items():
        lines += _cluster_markdown(cluster, c, slots, labels)
    lines += [block.rstrip("\n") + "\n" for block in extra]
    return "\n".join(lines).rstrip("\n") + "\n"


def _cluster_markdown(cluster: str, c: Mapping[str, Any], slots: Sequence[str], labels: Mapping[str, str]) -> list[str]:
    datasets = list(c["datasets"].values())
    tuned = [d["slots"]["tuned_zeroshot"] for d in datasets if "tuned_zeroshot" in d["slots"]]
    runs = sorted({str(t["run"]) for t in tuned})
    lines = [f"## Held out: {cluster}" + (f" (model `{'`, `'.join(runs)}`)" if runs else ""), ""]
    if tuned:
        # Per-template test scores of the instruction-tuned model; template ids are the eval shard's.
        ids = sorted({t["template_id"] for x in tuned for t in x["per_template"]})
        head = ["dataset", "metric", *(f"t{i}" for i in ids), "mean ± std", "best dev template (test)"]
        rows = []
        for d in datasets:
            x = d["slots"].get("tuned_zeroshot")
            if x is None:
                continue
            by_id = {t["template_id"]: t.get("test") for t in x["per_template"]}
            best = "–" if x["best_dev_template"] is None else f"t{x['best_dev_template']}: {_fmt(x['best_dev_test'])}"
            rows.append([d["dataset"], d["metric"], *(_fmt(by_id.get(i)) for i in ids), _mean_std(x), best])
        lines += ["Instruction-tuned, zero-shot, test score per template:", "", *_md_table(head, rows), ""]
    lines += [
        "Each cell: mean ± std over templates [95% bootstrap interval of the mean, over test examples] / "
        "best-dev-template test score.",
        "",
    ]
    head = ["dataset", "metric", *(labels[s] for s in slots)]
    rows = [[d["dataset"], d["metric"], *(_cell(d["slots"].get(s)) for s in slots)] for d in datasets]
    rows.append(["**cluster average**", "", *(_average_cell(c["average"][s], len(datasets)) for s in slots)])
    return [*lines, *_md_table(head, rows), "", *_published_markdown(datasets)]


# The paper's models, in the order of its comparison table, and the model flanpipe reproduces FLAN with.
PUBLISHED_MODELS = (
    ("flan_137b_zero_shot", "FLAN 137B zero-shot"),
    ("flan_137b_few_shot", "FLAN 137B few-shot"),  # its exemplar count (flan_137b_few_shot_k) in the cell
    ("lamda_pt_137b_zero_shot", "LaMDA-PT 137B zero-shot"),
    ("lamda_pt_137b_few_shot", "LaMDA-PT 137B few-shot"),
    ("gpt3_175b_zero_shot", "GPT-3 175B zero-shot"),
    ("gpt3_175b_few_shot", "GPT-3 175B few-shot"),
)
FLAN_BASE_MODEL = "lamda_pt_137b"


def _published_cell(published: Mapping[str, Any], key: str) -> str:
    """One published figure; a few-shot one with its exemplar count ("84.5 (k=8)") when the source gives it."""
    cell = _fmt(published.get(key))
    k = published.get(f"{key}_k")
    return f"{cell} (k={k})" if k is not None and published.get(key) is not None else cell


def _published_markdown(datasets: Sequence[Mapping[str, Any]]) -> list[str]:
    """Ours (tuned, zero-shot, mean over templates) beside the paper's published scores. A run on the
    paper's base model (lamda_pt_137b) reproduces FLAN 137B, so it gets 'ours − FLAN'; any other model
    shows the paper's figures as a reference only. Nothing when no dataset carries published scores."""
    have = [d for d in datasets if d.get("published")]
    if not have:
        return []
    ours = {d["dataset"]: d["slots"].get("tuned_zeroshot") for d in have}
    same = all(x is not None and x.get("model") == FLAN_BASE_MODEL for x in ours.values())
    head = ["dataset", "ours (tuned, zero-shot)", *(label for _, label in PUBLISHED_MODELS)]
    head += ["ours − FLAN 137B"] if same else []
    rows = []
    for d in have:
        p, x = d["published"], ours[d["dataset"]]
        mine = None if x is None else x.get("mean")
        row = [d["dataset"], _fmt(mine), *(_published_cell(p, k) for k, _ in PUBLISHED_MODELS)]
        flan = p.get("flan_137b_zero_shot")
        if same:
            row.append("–" if mine is None or flan is None else f"{mine - flan:+.1f}")
        rows.append(row)
    title = "Beside the paper (same base model: difference to FLAN 137B)" if same else "The paper's numbers (reference)"
    sources = sorted({str(d["published"]["source"]) for d in have})
    return [f"{title}:", "", *_md_table(head, rows), "", *(f"Source: {src}" for src in sources), ""]


# ---------------------------------------------------------------------------------------------------
# ablations


def ablation_value(name: str, record: Record) -> int | str:
    """Normalise an ablation value: ints for counts and sizes, 'train->eval' for instruction settings."""
    v = record["ablation_value"]
    if name == "instructions":
        return "".join(str(v).split())  # "natural -> natural" == "natural->natural"
    if name == "options":
        return str(v)  # "always->no options": training setting -> evaluation prompt
    return int(v)


def instruction_label(value: str) -> str:
    """The paper's names for the instruction settings; other combinations spelled out."""
    return _INSTRUCTION_LABELS.get(value) or value.replace("_", " ").replace("->", " -> ")


def _value_label(name: str, value: int | str, models: Sequence[str]) -> str:
    if name == "instructions":
        return instruction_label(str(value))
    if name == "options":
        return str(value).replace("->", " -> ")
    if name == "scale":
        return format_params(int(value)) + (f" ({', '.join(models)})" if models else "")
    return str(value)


def summarize_ablation(name: str, records: Sequence[Record], experiment: str = "flanpipe") -> dict[str, Any]:
    """Held-out average per ablation value (per role for the scale ablation), with per-cluster detail."""
    if name not in ABLATION_NAMES:
        raise ValueError(f"unknown ablation {name!r}; expected one of {ABLATION_NAMES}")
    cells = _unique(
        records,
        lambda r: (str(r["role"]), ablation_value(name, r), held_out_of(r), str(r["dataset"])),
        f"ablation {name}",
    )
    # Points in paper order: numbers ascending; instruction settings as the config lists them.
    seen: dict[tuple[str, int | str], None] = {}
    for role, value, _, _ in cells:
        seen.setdefault((role, value), None)
    in_order = name in ("instructions", "options")  # settings in the order the ablation lists them
    keys = list(seen) if in_order else sorted(seen, key=lambda k: (k[0] != RunRole.TUNED.value, k[1]))
    reference = PAPER_REFERENCE.get(name, {})
    points = []
    for role, value in keys:
        mine = {k: r for k, r in cells.items() if k[:2] == (role, value)}
        clusters: dict[str, Any] = {}
        for (_, _, cluster, dataset), r in sorted(mine.items(), key=lambda kv: kv[0][2:]):
            c = clusters.setdefault(cluster, {"datasets": {}})
            c["datasets"][dataset] = {
                "metric": r["metric"],
                **{k: v for k, v in _dataset_scores(r).items() if k != "per_template"},
            }
        for c in clusters.values():
            c["average"] = _mean(d["mean"] for d in c["datasets"].values())
            c["average_best_dev"] = _mean(d["best_dev_test"] for d in c["datasets"].values())
        models = sorted({str(r["model"]) for r in mine.values() if r.get("model")})
        points.append(
            {
                "value": value,
                "label": _value_label(name, value, models),
                "role": role,
                "models": models,
                "held_out_average": _mean(c["average"] for c in clusters.values()),
                "held_out_average_best_dev": _mean(c["average_best_dev"] for c in clusters.values()),
                "n_clusters": len(clusters),
                "clusters": clusters,
                "paper": reference.get(value) if role == RunRole.TUNED.value else None,
            }
        )
    return {"ablation": name, "experiment": experiment, "score": SCORE_NOTE, "points": points}


_VALUE_HEADER = {
    "clusters": "training clusters",
    "scale": "model size (parameters)",
    "instructions": "instruction setting (train -> eval)",
    "templates": "templates per dataset",
    "options": "options in training -> in evaluation",
}


def ablation_markdown(ablation: Mapping[str, Any]) -> str:
    """One table row per ablation point: per-cluster averages, held-out average, best dev, paper."""
    name, points = ablation["ablation"], ablation["points"]
    clusters = sorted({c for p in points for c in p["clusters"]})
    roles = len({p["role"] for p in points}) > 1
    has_paper = any(p["paper"] is not None for p in points)
    head = [_VALUE_HEADER[name], *(["role"] if roles else []), *clusters, "held-out average", "best dev template"]
    head += ["paper (137B)"] if has_paper else []
    rows = []
    for p in points:
        row = [p["label"], *([RunRole(p["role"]).label] if roles else [])]
        row += [_fmt(p["clusters"][c]["average"]) if c in p["clusters"] else "–" for c in clusters]
        row += [f"**{_fmt(p['held_out_average'])}**", _fmt(p["held_out_average_best_dev"])]
        row += [_fmt(p["paper"])] if has_paper else []
        rows.append(row)
    title = f"## Ablation: {name} ({ablation['experiment']})"
    note = (
        "Held-out scores: test split, 0-100, mean over templates "
        "(best dev: test score of the template with the best validation score)."
    )
    return "\n".join([title, "", note, "", *_md_table(head, rows)]) + "\n"


# ---------------------------------------------------------------------------------------------------
# records from files (the CLI; the workflow builds richer records from the plan)


def load_records(paths: Sequence[str | os.PathLike[str]], meta: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Eval JSON files plus what the plan knows about each (run, variant, held-out cluster, role...)."""
    if len(paths) != len(meta):
        raise ValueError(f"{len(paths)} result files but {len(meta)} metadata entries")
    return [{**read_json(p), **m} for p, m in zip(paths, meta, strict=True)]


def records_from_paths(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read ``results/eval/{run}/{variant}/{dataset}.json`` files into records, using only the path.

    Without the plan the held-out cluster is the dataset's own cluster and the role is read off the
    run name (flanpipe.core.vocab.role_of_run_name).
    """
    out = []
    for p in paths:
        path = Path(p)
        r = dict(read_json(path))
        run, variant = path.parent.parent.name, path.parent.name
        r.setdefault("run", run)
        r.setdefault("variant", variant)
        r.setdefault("held_out", r["cluster"])
        r.setdefault("role", role_of_run_name(run).value)
        out.append(r)
    return out


__all__ = [
    "ABLATION_NAMES",
    "PAPER_REFERENCE",
    "ablation_markdown",
    "instruction_label",
    "markdown",
    "load_records",
    "records_from_paths",
    "summarize_main",
    "summarize_ablation",
]
