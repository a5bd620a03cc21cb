"""The rerun contract of every rule: its tracked params (the facts its outputs depend on, canonical) and its
operational settings (``flanpipe.core.rerun.Operational``: they reach the job, never rerun it).

rules/*.smk read these functions and nothing else of the config for their params, and the CLI builds the same
facts for a step run by hand (``flanpipe ingest`` rebuilds its DatasetSpec from ``ingest_spec``'s facts as the
rule does). ARCH.md's "The rerun contract" table is this module in prose; README's "you change X -> these
rules rerun" table is checked against real dry runs by tests/test_rerun_contract.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flanpipe.core.registry import DatasetSpec, ingest_facts, render_facts
from flanpipe.core.rerun import Operational, canonical

EVAL_NOT_SCORING: dict[str, str] = {
    "batch_size": "operational: examples per forward pass (floating-point sums may differ in the last bits)",
    "layout": "operational: the TP x PP the model loads at (dist_checkpointing reshards any layout)",
    "examples": "reaches evaluate through its eval shards (render_eval_shard and audit track it)",
    "eval_only_all_runs": "planning: which evaluations exist, not what one writes",
}
"""Keys of the config's ``eval`` block that are not evaluate's facts, and why. Every other key (``scoring``,
and any key added later) is a fact: evaluate tracks it and receives it as a keyword of evaluate_many."""


def ingest_spec(config: Mapping[str, Any], spec: DatasetSpec) -> tuple[dict[str, Any], Operational]:
    """Rules ingest / download: the entry's facts (what changes its canonical parquets; ``ingest_policy`` adds
    the train role's) and the operational settings (where the data and the HuggingFace cache live, which
    registry file to name)."""
    data = config["data"]
    facts = ingest_facts(spec, data["bad_rows"])
    return facts, Operational({"root": data["root"], "hf_cache": data["hf_cache"], "defined_in": spec.defined_in})


def ingest_policy(config: Mapping[str, Any], split: str) -> dict[str, Any]:
    """Rules ingest / download: ``data.split_duplicates`` for the train role (what happens to train rows that are
    eval rows changes the train parquet) and nothing for the eval roles, which it never changes."""
    return {"split_duplicates": config["data"]["split_duplicates"]} if split == "train" else {}


def dataset_render_facts(spec: DatasetSpec) -> dict[str, Any]:
    """Rules render_shard / render_eval_shard: what rendering reads of the registry entry."""
    return render_facts(spec)


def template_facts(templates: list[Any]) -> list[Any]:
    """A dataset's parsed templates (``Plan.templates``): what its template file says, without comments, key
    order or YAML spelling. Rules that render or audit templates track this and read the file as an input that
    only has to exist (``ancient``), so an edited comment reruns nothing and an edited template reruns them."""
    return canonical(templates)


def eval_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rule evaluate's facts of the ``eval`` block: every key but EVAL_NOT_SCORING's (today ``scoring``)."""
    return canonical({k: v for k, v in config["eval"].items() if k not in EVAL_NOT_SCORING})


def eval_ops(config: Mapping[str, Any]) -> Operational:
    """Rule evaluate's operational settings: batch size and the layout the model loads at."""
    from flanpipe.eval.layout import eval_layout

    return Operational({"batch_size": config["eval"]["batch_size"], "layout": list(eval_layout(config))})


def train_ops(config: Mapping[str, Any]) -> Operational:
    """Rule train's ``--ops``: flanpipe.core.train_config.OPERATIONAL from the config (micro-batch filled in by
    check_world for the profile's ranks)."""
    from flanpipe.plan.config import train_ops as ops

    return Operational(ops(config))


def lengths(config: Mapping[str, Any]) -> dict[str, Any]:
    """``lengths`` in canonical form (its key order in the YAML is no fact)."""
    return canonical(config["lengths"])


def block(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A whole config block that is all facts (``mixture``, ``audit``, ``synthetic``), canonical."""
    return canonical(config[key])
