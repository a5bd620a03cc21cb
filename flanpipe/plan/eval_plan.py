"""Which evaluations share one model load: the evaluation jobs of the DAG (torch-free: the Snakefile imports it).

One job scores one model on every planned (variant, dataset) of one cluster: all prompt variants
(natural, natural-noopts, 2-shot ...) of the cluster's datasets under one load. Loading a model
(interpreter, torch and Megatron imports, process groups, reading the checkpoint) costs more than scoring
a small dataset, so one load per dataset wasted most of an evaluation stage. A cluster is the unit the
report averages over, so grouping by cluster keeps clusters in parallel jobs, and a run that holds out
several clusters (the base model) still scores them side by side.

Why variants share the job (measured 2026-12-07, 2-core machine, default DAG): per (model, variant,
cluster), 12 jobs each paid ~2.3 s CPU of interpreter, imports and load against ~2.7-3.8 s of scoring
(41-46%: torch and `megatron.core` alone are ~2.7 s); merging variants makes 4 jobs, each paying the
start once for 2-4x the scoring. Variants cost no extra reruns together: a template edit changes the
edited dataset's eval shard of every variant that renders templates, so each of those jobs reran anyway.

What a template edit reruns: every job whose group holds the edited dataset, i.e. the whole (model,
cluster) group, not only that dataset (Snakemake reruns jobs, not parts of jobs). Its result files are all
rewritten; datasets of other clusters and models are untouched.

Why not one job per model across clusters: only the base model holds out more than one cluster here
(each tuned run holds out one), so that would drop one more load of the default's 4 while running the
base model's clusters serially and widening what a template edit reruns to every cluster of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from flanpipe.core.registry import DatasetSpec
from flanpipe.plan.runs import Evaluation

if TYPE_CHECKING:
    from flanpipe.plan.experiments import Plan


def eval_group_name(spec: DatasetSpec) -> str:
    """The {cluster} of a dataset's evaluation job: its cluster, or ``<cluster>__<name>`` for an eval-only one.

    An evaluation-only entry (registry ``eval_only``) is often added to a finished run; in its own job it
    plans one model load for itself instead of rerunning (and re-scoring) its whole cluster's job.
    """
    return f"{spec.cluster}__{spec.name}" if spec.eval_only else spec.cluster


def result_name(variant: str, dataset: str) -> str:
    """A member's result inside its job's directory, ``<variant>/<dataset>`` (``.json``, ``.predictions.parquet``)."""
    return f"{variant}/{dataset}"


def group_key(evaluation: Evaluation, cluster_of: Mapping[str, str]) -> tuple[str, str]:
    """(model run, cluster): the evaluations that one job (one model load) serves."""
    return evaluation.run, cluster_of[evaluation.dataset]


def eval_groups(
    evaluations: Iterable[Evaluation], cluster_of: Mapping[str, str]
) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """Group key -> its (variant, dataset) members (sorted, unique) over every planned evaluation."""
    groups: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for e in evaluations:
        groups.setdefault(group_key(e, cluster_of), set()).add((e.variant, e.dataset))
    return {k: sorted(v) for k, v in sorted(groups.items())}


def group_members(
    groups: Mapping[tuple[str, str], list[tuple[str, str]]],
    run: str,
    cluster: str,
    unplanned: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The (variant, dataset) members of one group, or an error naming the groups the plan has (a hand-typed
    target).

    A group the plan lacks is still served when ``unplanned`` names members: a result asked for by hand
    (e.g. a tuned model on a cluster it trained on, to check that training took) evaluates the
    ``unplanned`` members, the cluster's evaluable datasets under the plan's variants, in one job like any
    other group.
    """
    key = (run, cluster)
    if key not in groups and (fallback := sorted(set(unplanned))):
        return fallback
    if key not in groups:
        known = ", ".join("/".join(k) for k in list(groups)[:8])
        raise ValueError(f"no planned evaluation of {run} on cluster {cluster}; planned: {known} ...")
    return groups[key]


def planned_group_members(plan: Plan, run: str, cluster: str) -> list[tuple[str, str]]:
    """The (variant, dataset) pairs one evaluation job scores: its (model, cluster) group over every planned
    evaluation, ablations included (one model load serves them all); rule evaluate and ``flanpipe cost``.
    A group the plan lacks (a hand-typed target) gets the cluster's evaluable datasets under their zero-shot
    variants."""
    planned = plan.evaluations + [e for es in plan.ablations.values() for e in es]
    cluster_of = {name: eval_group_name(spec) for name, spec in plan.registry.items()}
    evaluable = [d for d, c in cluster_of.items() if c == cluster and plan.registry[d].has_eval_splits]
    by_hand = [(v, d) for d in evaluable for v in plan.zero_shot_variants(d)]
    return group_members(eval_groups(planned, cluster_of), run, cluster, by_hand)
