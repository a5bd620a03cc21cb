"""Which evaluations share one model load: the evaluation jobs of the DAG (torch-free: the Snakefile imports it).

One job scores one model under one prompt variant on every planned dataset of one cluster. Loading a
model (imports, process groups, reading the checkpoint) costs more than scoring a small dataset, so one
load per dataset wasted most of an evaluation stage. Grouping by cluster keeps a held-out cluster (the
unit the report averages over) in one job and keeps clusters in parallel jobs.

What a template edit reruns: the edited dataset's eval shards change, so every job whose group holds
that dataset reruns, i.e. the whole (model, variant, cluster) group, not only that dataset (Snakemake
reruns jobs, not parts of jobs). The per-dataset result files are then all rewritten; datasets of other
clusters, variants and models are untouched.

Why not one job per (model, variant) across clusters (measured 2026-12-05, shared 2-core machine, default
DAG, `flanpipe bench eval-stage`): the 12 cluster jobs take 7.7-15.8 s each, 131.6 s summed (load 0.6 -> 2.4);
interpreter + imports + model load alone are ~6-8 s of each (import 3.1-5.0 s, load 3.1-3.4 s, load 3.9).
So the load still dominates a zero-shot job, but only the base model holds out more than one cluster here
(each tuned run holds out one), so that grouping would drop 4 of 12 jobs, ~25-30 s summed, while running
the clusters serially instead of in parallel and widening what a template edit reruns to every cluster of
the base model. Revisit at scale, where a load is minutes: there a run holding out several clusters pays
one load per cluster.
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


def group_key(evaluation: Evaluation, cluster_of: Mapping[str, str]) -> tuple[str, str, str]:
    """(model run, variant, cluster): the evaluations that one job (one model load) serves."""
    return evaluation.run, evaluation.variant, cluster_of[evaluation.dataset]


def eval_groups(
    evaluations: Iterable[Evaluation], cluster_of: Mapping[str, str]
) -> dict[tuple[str, str, str], list[str]]:
    """Group key -> its datasets (sorted, unique) over every planned evaluation."""
    groups: dict[tuple[str, str, str], set[str]] = {}
    for e in evaluations:
        groups.setdefault(group_key(e, cluster_of), set()).add(e.dataset)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def group_datasets(
    groups: Mapping[tuple[str, str, str], list[str]],
    run: str,
    variant: str,
    cluster: str,
    unplanned: Iterable[str] = (),
) -> list[str]:
    """The datasets of one group, or an error naming the groups the plan has (a hand-typed target).

    A group the plan lacks is still served when ``unplanned`` names datasets: a result asked for by hand
    (e.g. a tuned model on a cluster it trained on, to check that training took) evaluates the
    ``unplanned`` datasets, the cluster's evaluable ones, in one job like any other group.
    """
    key = (run, variant, cluster)
    if key not in groups and (fallback := sorted(set(unplanned))):
        return fallback
    if key not in groups:
        known = ", ".join("/".join(k) for k in list(groups)[:8])
        raise ValueError(f"no planned evaluation of {run} under {variant} on cluster {cluster}; planned: {known} ...")
    return groups[key]


def planned_group_datasets(plan: Plan, run: str, variant: str, cluster: str) -> list[str]:
    """The datasets one evaluation job scores: its (model, variant, cluster) group over every planned
    evaluation, ablations included (one model load serves them all); rule evaluate and ``flanpipe cost``."""
    planned = plan.evaluations + [e for es in plan.ablations.values() for e in es]
    cluster_of = {name: eval_group_name(spec) for name, spec in plan.registry.items()}
    evaluable = [d for d, c in cluster_of.items() if c == cluster and plan.registry[d].has_eval_splits]
    return group_datasets(eval_groups(planned, cluster_of), run, variant, cluster, evaluable)
