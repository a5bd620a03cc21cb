"""Figures for the report, shaped like the FLAN paper's: held-out clusters tuned vs base (bars), and
the ablations (held-out average vs training clusters, model size, instruction setting, templates).

The rule-level writers live here too (write_summary, write_ablation, write_report): they put the
tables of flanpipe.report.tables and their figures on disk together, so flanpipe.report.tables never imports this
module. Each figure is built by a function that returns a matplotlib ``Figure`` (tests inspect its axes and
labels without decoding pixels) and is written by ``save_figure`` (atomically, like every output).
Figures are built on ``matplotlib.figure.Figure`` directly, not pyplot: no global figure registry,
so a long Snakemake run or a test session never accumulates open figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display

from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from flanpipe.core.io import (  # noqa: E402
    atomic_path,
    write_json,
)
from flanpipe.core.rerun import version_record
from flanpipe.core.vocab import (  # noqa: E402
    FLAN_SETTING,
    RunRole,
)
from flanpipe.report.tables import (  # noqa: E402
    Record,
    ablation_markdown,
    format_params,
    markdown,
    records_from_paths,
    slot_label,
    slot_shots,
    summarize_ablation,
    summarize_main,
)

TUNED, BASE = RunRole.TUNED.value, RunRole.BASE.value  # the records' ``role`` values

SCORE_AXIS = "score (0-100, test split, mean over templates)"
HELD_OUT_AXIS = "held-out average score (0-100, test split, mean over templates)"

# Tuned runs in the strong colour, the untuned base in greys: the comparison the paper draws.
COLORS = {
    "tuned_zeroshot": "#1f5fa8",
    "base_zeroshot": "#8c8c8c",
    "base_fewshot": "#c9c9c9",
    "paper": "#b0b0b0",
    "cluster": "#7fa7d4",
}
CLUSTER_MARKERS = ("^", "v", "<", ">", "P", "X")
SUMMARY_SLOTS = ("tuned_zeroshot", "base_zeroshot", "base_fewshot")

ABLATION_TITLES = {
    "clusters": "held-out average vs number of instruction-tuning clusters",
    "scale": "held-out average vs model size: instruction-tuned vs untuned base",
    "instructions": "role of instructions: held-out average by instruction setting",
    "templates": "held-out average vs number of templates per dataset in training",
    "options": "options block: trained always / never / mixed, evaluated with and without",
}
ABLATION_XLABELS = {
    "clusters": "number of clusters used for instruction tuning",
    "scale": "model size (parameters, log scale)",
    "instructions": "instruction setting (fine-tuning -> evaluation)",
    "templates": "number of instruction templates per dataset (training)",
    "options": "options block in training prompts",
}


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> None:
    """Write a PNG atomically: a killed job must not leave a half-written image for the report."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def _score_ylim(ax: Axes, values: Sequence[float], bars: bool) -> None:
    """Bars start at 0 (their length is the value); lines zoom to the data, both stay within 0-100."""
    hi = max(values, default=0.0)
    lo = 0.0 if bars else max(0.0, min(values, default=0.0) - 10.0)
    ax.set_ylim(lo, min(100.0, hi + 12.0) if hi < 88.0 else 100.0)


def _legend_below(ax: Axes, handles: Sequence[Any] | None = None) -> None:
    """Legend under the x label: long labels never cover the bars or squeeze the plot sideways."""
    kwargs = {"handles": list(handles)} if handles is not None else {}
    ax.legend(**kwargs, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, fontsize=8, frameon=False)


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


# ---------------------------------------------------------------------------------------------------
# main results


def summary_figure(summary: Mapping[str, Any], experiment: str) -> Figure:
    """Grouped bars: per held-out cluster (and their average), instruction-tuned zero-shot next to the
    untuned base zero-shot and few-shot. Bar = mean over templates; black tick = best-dev template; error bar =
    95% interval of the average (stratified bootstrap over examples, the table's) where every dataset kept
    per-example scores;
    dashed line = chance (random option) where every dataset of the group is an option task."""
    clusters = list(summary["clusters"])
    groups = [*clusters, "average"] if len(clusters) > 1 else clusters
    slots = [s for s in SUMMARY_SLOTS if s in summary["slots"]]
    shots = slot_shots(summary, "base_fewshot")

    def value(group: str, slot: str, key: str) -> float | None:
        if group == "average":
            return summary["held_out_average"][slot][key]
        return summary["clusters"][group]["average"][slot][key]

    fig = Figure(figsize=(max(6.5, 0.75 * len(groups) * max(1, len(slots)) + 1.5), 5.2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(slots))
    heights: list[float] = []
    handles: list[Any] = []
    for i, slot in enumerate(slots):
        xs = [g + (i - (len(slots) - 1) / 2) * width for g in range(len(groups))]
        ys = [value(g, slot, "mean") for g in groups]
        best = [value(g, slot, "best_dev") for g in groups]
        label = slot_label(slot, shots if slot.startswith("base_fewshot") else None) + " (mean over templates)"
        color = COLORS.get(slot, "#555555")
        handles.append(
            ax.bar(xs, [y or 0.0 for y in ys], width, label=label, color=color, edgecolor="black", linewidth=0.5)
        )
        cis = [value(g, slot, "mean_ci") for g in groups]
        if bars := [(x, y, ci) for x, y, ci in zip(xs, ys, cis, strict=True) if y is not None and ci]:
            ex, ey, eci = zip(*bars, strict=True)
            err = [
                [y - ci["lo"] for y, ci in zip(ey, eci, strict=True)],
                [ci["hi"] - y for y, ci in zip(ey, eci, strict=True)],
            ]
            ax.errorbar(ex, ey, yerr=err, fmt="none", ecolor="#333333", elinewidth=1, capsize=3, zorder=4)
            heights += [ci["hi"] for ci in eci]
        for x, y, b in zip(xs, ys, best, strict=True):
            if b is not None:
                ax.plot([x - width * 0.4, x + width * 0.4], [b, b], color="black", lw=2, zorder=3)
            # The value goes above whichever is higher, the bar or its best-dev tick, so neither hides it.
            top = max(v for v in (y, b, 0.0) if v is not None)
            text = "n/a" if y is None else f"{y:.1f}"
            ax.annotate(text, (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        heights += [v for v in ys + best if v is not None]
    for g, group in enumerate(groups):  # chance: the same options whatever the slot, so the first known one
        level = next((c for s in slots if (c := value(group, s, "chance")) is not None), None)
        if level is not None:
            ax.plot([g - 0.45, g + 0.45], [level, level], color="#888888", ls="--", lw=1, zorder=5)
            heights.append(level)
    if any(ln.get_linestyle() == "--" for ln in ax.lines):
        handles.append(Line2D([], [], color="#888888", ls="--", lw=1, label="chance (random option)"))
    handles.append(Line2D([], [], color="black", lw=2, label="best-dev template (test score)"))
    if ax.containers and any(type(c).__name__ == "ErrorbarContainer" for c in ax.containers):
        handles.append(Line2D([], [], color="#333333", lw=1, marker="_", label="95% bootstrap interval of the mean"))
    ax.set_xticks(range(len(groups)), [_group_label(summary, g) for g in groups])
    _score_ylim(ax, heights, bars=True)
    _finish(
        ax,
        f"{experiment}\n" + _summary_title(slots),
        "held-out cluster (model tuned on all other clusters)",
        SCORE_AXIS,
    )
    _legend_below(ax, handles)
    return fig


def _summary_title(slots: Sequence[str]) -> str:
    """Say what is compared; without a base model the figure must not promise a comparison."""
    if any(s.startswith("base_") for s in slots):
        return "held-out cluster: instruction-tuned vs untuned base (zero-shot, few-shot)"
    return "held-out cluster: instruction-tuned, zero-shot (no untuned base evaluated)"


def _group_label(summary: Mapping[str, Any], group: str) -> str:
    if group == "average":
        return f"held-out average\n({len(summary['clusters'])} clusters)"
    n = len(summary["clusters"][group]["datasets"])
    return f"{group.replace('_', ' ')}\n({n} dataset{'s' if n != 1 else ''})"


# ---------------------------------------------------------------------------------------------------
# ablations


def ablation_figure(ablation: Mapping[str, Any]) -> Figure:
    """The ablation's figure in the paper's shape: a line over a count, a log-x line pair over model
    size, or bars over instruction settings."""
    name = ablation["ablation"]
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    if name == "scale":
        values = _scale_axes(ax, ablation["points"])
    elif name == "instructions":
        values = _instruction_axes(ax, ablation["points"])
    elif name == "options":
        values = _options_axes(ax, ablation["points"])
    else:
        values = _count_axes(ax, ablation["points"])
    _score_ylim(ax, values, bars=name in ("instructions", "options"))
    _finish(ax, f"{ablation['experiment']}\n{ABLATION_TITLES[name]}", ABLATION_XLABELS[name], HELD_OUT_AXIS)
    if name not in ("instructions", "options"):  # their bars carry their own legend handles
        _legend_below(ax)
    return fig


def _annotate(ax: Axes, xs: Sequence[float], ys: Sequence[float], below: Sequence[bool] | None = None) -> None:
    """Value labels on a line's points, above by default; ``below`` flips chosen points under their
    marker, so where two lines run close the lower one's labels do not print over the upper one's."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        dy, va = (-9, "top") if below is not None and below[i] else (7, "bottom")
        ax.annotate(
            f"{y:.1f}",
            (x, y),
            textcoords="offset points",
            xytext=(0, dy),
            ha="center",
            va=va,
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
        )


def _present(points: Sequence[Mapping[str, Any]], key: str) -> tuple[list[Any], list[float]]:
    xs = [p["value"] for p in points if p[key] is not None]
    return xs, [p[key] for p in points if p[key] is not None]


def _count_axes(ax: Axes, points: Sequence[Mapping[str, Any]]) -> list[float]:
    """Clusters / templates: bold held-out average line, thin per-cluster lines, paper's curve dashed."""
    tuned = [p for p in points if p["role"] == TUNED]
    drawn: list[float] = []
    for i, cluster in enumerate(sorted({c for p in tuned for c in p["clusters"]})):
        pts = [(p["value"], p["clusters"][cluster]["average"]) for p in tuned if cluster in p["clusters"]]
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        ax.plot(
            *zip(*pts, strict=True),
            marker=CLUSTER_MARKERS[i % len(CLUSTER_MARKERS)],
            ms=4,
            lw=1,
            ls=":",
            color=COLORS["cluster"],
            label=f"held out: {cluster.replace('_', ' ')}",
        )
        drawn += [y for _, y in pts]
    xs, ys = _present(tuned, "held_out_average")
    ax.plot(xs, ys, marker="o", lw=2.2, color=COLORS["tuned_zeroshot"], label="held-out average (this run)")
    _annotate(ax, xs, ys)
    px, py = _present(tuned, "paper")
    if px:
        ax.plot(
            px,
            py,
            ls="--",
            marker="s",
            mfc="none",
            color=COLORS["paper"],
            label="paper, LaMDA-PT 137B (shape reference)",
        )
    ax.set_xticks(sorted({p["value"] for p in tuned}))
    return drawn + ys + py


def _scale_axes(ax: Axes, points: Sequence[Mapping[str, Any]]) -> list[float]:
    """Model size: instruction-tuned vs untuned base held-out averages over parameters (log x)."""
    styles = {TUNED: ("o", "-", COLORS["tuned_zeroshot"]), BASE: ("s", "--", COLORS["base_zeroshot"])}
    labels = {r.value: f"{r.label} (zero-shot)" for r in RunRole}
    lines = {role: _present([p for p in points if p["role"] == role], "held_out_average") for role in styles}
    at = {role: dict(zip(*lines[role], strict=True)) for role in styles}
    drawn: list[float] = []
    for role, (xs, ys) in lines.items():
        if not xs:
            continue
        marker, ls, color = styles[role]
        ax.plot(xs, ys, marker=marker, ls=ls, lw=2, color=color, label=labels[role])
        other = at[BASE if role == TUNED else TUNED]
        # At each size the lower of the two lines labels its point from below (ties: base below).
        lower = [x in other and (y < other[x] or (y == other[x] and role == BASE)) for x, y in zip(xs, ys, strict=True)]
        _annotate(ax, xs, ys, below=lower)
        drawn += ys
    ax.set_xscale("log")
    sizes = sorted({p["value"] for p in points})
    ax.set_xticks(sizes, [format_params(s) for s in sizes])
    ax.minorticks_off()
    if len(sizes) == 1:  # a single size: give the log axis some room around it
        ax.set_xlim(sizes[0] / 3, sizes[0] * 3)
    return drawn


def _instruction_axes(ax: Axes, points: Sequence[Mapping[str, Any]]) -> list[float]:
    """Instruction settings as bars (FLAN's own setting highlighted), paper's averages as markers."""
    tuned = [p for p in points if p["role"] == TUNED]
    ys = [p["held_out_average"] for p in tuned]
    flan = [p["value"] == FLAN_SETTING for p in tuned]
    colors = [COLORS["tuned_zeroshot"] if f else COLORS["cluster"] for f in flan]
    bars = ax.bar(range(len(tuned)), [y or 0.0 for y in ys], 0.6, color=colors, edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, labels=["n/a" if y is None else f"{y:.1f}" for y in ys], fontsize=8, padding=2)
    handles: list[Any] = []
    if any(flan):
        handles.append(Patch(facecolor=colors[flan.index(True)], edgecolor="black", label="FLAN: natural instructions"))
    if not all(flan):
        handles.append(Patch(facecolor=COLORS["cluster"], edgecolor="black", label="other instruction settings"))
    paper = [(i, p["paper"]) for i, p in enumerate(tuned) if p["paper"] is not None]
    if paper:
        handles.append(
            ax.scatter(
                *zip(*paper, strict=True),
                marker="D",
                s=30,
                facecolors="none",
                edgecolors="black",
                zorder=3,
                label="paper, LaMDA-PT 137B",
            )
        )
    ax.set_xticks(range(len(tuned)), [_wrap_setting(p["label"]) for p in tuned], fontsize=8)
    _legend_below(ax, handles)
    return [y for y in ys if y is not None] + [y for _, y in paper]


def _options_axes(ax: Axes, points: Sequence[Mapping[str, Any]]) -> list[float]:
    """One group per training setting, a bar each for evaluation with and without the options block."""
    tuned = [p for p in points if p["role"] == "tuned"]
    settings = list(dict.fromkeys(str(p["value"]).split("->")[0] for p in tuned))
    shown = {"options": (COLORS["tuned_zeroshot"], -0.2), "no options": (COLORS["cluster"], 0.2)}
    ys: list[float] = []
    handles: list[Any] = []
    for evaluated, (color, dx) in shown.items():
        xs, heights = [], []
        for p in tuned:
            train, _, ev = str(p["value"]).partition("->")
            if ev == evaluated:
                xs.append(settings.index(train) + dx)
                heights.append(p["held_out_average"])
        if not xs:
            continue
        bars = ax.bar(xs, [h or 0.0 for h in heights], 0.4, color=color, edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=["n/a" if h is None else f"{h:.1f}" for h in heights], fontsize=8, padding=2)
        handles.append(Patch(facecolor=color, edgecolor="black", label=f"evaluated with {evaluated}"))
        ys += [h for h in heights if h is not None]
    ax.set_xticks(range(len(settings)), [f"trained: {s}" for s in settings], fontsize=8)
    _legend_below(ax, handles)
    return ys


def _wrap_setting(label: str) -> str:
    """'dataset name -> dataset name' on two lines, so neighbouring tick labels never collide."""
    return label.replace(" -> ", "\n-> ").replace(" (", "\n(")


# ---------------------------------------------------------------------------------------------------
# the report's files: tables (flanpipe.report.tables) and figures written together


def write_summary(
    records: Sequence[Record],
    out_json: str | os.PathLike[str],
    out_md: str | os.PathLike[str],
    figure_path: str | os.PathLike[str],
    *,
    experiment: str = "flanpipe",
    extra_markdown: Sequence[str] = (),
    audits: Mapping[str, Mapping[str, Any]] | None = None,
    published: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Rule ``report``: summary.json, summary.md (linking the figure) and the held-out bar chart.

    ``audits``: run -> contamination audit, for the clean-subset columns (flanpipe.report.tables.clean_subset);
    ``published``: dataset -> the paper's scores (registry ``published:``), shown beside ours;
    ``seed``: of the bootstrap intervals on the averages (stated in summary.md).

    ``experiment`` (the config's name or path) titles the Markdown and the figure, so a figure copied
    out of its directory still says which experiment it shows. ``extra_markdown`` blocks (e.g. the
    ablation tables returned by write_ablation) are appended to summary.md.
    """
    summary = {
        **summarize_main(records, experiment, audits, published=published, seed=seed),
        **version_record("report"),
    }
    save_figure(summary_figure(summary, experiment), figure_path)
    rel = os.path.relpath(Path(figure_path).resolve(), Path(out_md).resolve().parent)
    write_json(out_json, summary)
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown(summary, rel, extra_markdown), encoding="utf-8")
    return summary


def write_ablation(
    name: str,
    records: Sequence[Record],
    out_json: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    experiment: str = "flanpipe",
) -> str:
    """Rule ``ablation_<name>``: the ablation's JSON and figure; returns its Markdown table."""
    ablation = summarize_ablation(name, records, experiment)
    save_figure(ablation_figure(ablation), out_png)
    write_json(out_json, {**ablation, **version_record("ablation")})
    return ablation_markdown(ablation)


def write_report(
    result_paths: Sequence[str | os.PathLike[str]],
    out_json: str | os.PathLike[str],
    out_md: str | os.PathLike[str],
    figure_path: str | os.PathLike[str] | None = None,
    *,
    experiment: str = "flanpipe",
) -> dict[str, Any]:
    """`flanpipe report`: write_summary over eval files; the figure defaults to ``out_md`` with .png."""
    figure = figure_path if figure_path is not None else Path(out_md).with_suffix(".png")
    return write_summary(records_from_paths(result_paths), out_json, out_md, figure, experiment=experiment)
