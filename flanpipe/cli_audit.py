"""``flanpipe audit`` and ``flanpipe bench audit``: kept apart from cli.py so the audit is one unit.

flanpipe audit RUN --out FILE [--mixture FILE] [--ingest DIR]   rule audit (flanpipe.data.contamination)
flanpipe bench audit [--examples N] [--json]                    audit speed and peak RSS, planted leaks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flanpipe.core.io import resolve_config_path
from flanpipe.plan.config import ConfigError, load_config


def cmd_audit(args: argparse.Namespace) -> None:
    from flanpipe.data.contamination import AuditConfig, run_audit
    from flanpipe.plan.experiments import plan_experiment

    cfg = load_config(resolve_config_path(args.config))
    plan = plan_experiment(cfg)
    if args.run not in plan.mixtures:
        raise ConfigError(f"unknown run {args.run!r}; this config trains {sorted(plan.mixtures)}")
    datasets = plan.audited_datasets(args.run)
    ingest = Path(args.ingest)
    splits = {d: {s: str(ingest / d / f"{s}.parquet") for s in ("validation", "test")} for d in datasets}
    mixture = args.mixture or f"results/mixtures/{args.run}/mixture.parquet"
    templates = {d: str(plan.registry[d].templates) for d in plan.template_audited_datasets(args.run)}
    train = {d: str(ingest / d / "train.parquet") for d in plan.run_shards(args.run)}
    report = run_audit(
        mixture,
        splits,
        templates,
        args.out,
        AuditConfig(**cfg["audit"]),
        max_examples=cfg["eval"]["examples"],
        train_splits=train,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "datasets"}, indent=2))


def cmd_bench_audit(args: argparse.Namespace) -> None:
    from flanpipe.bench.audit import format_report, run_bench

    result = run_bench(examples=args.examples, leaks=args.leaks, workdir=Path(args.workdir) if args.workdir else None)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


def add_audit_commands(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Register the two subcommands on cli.py's parsers."""
    s = sub.add_parser("audit", help="contamination audit of one run's mixture vs its eval data")
    s.set_defaults(fn=cmd_audit)
    s.add_argument("run")
    s.add_argument("--out", required=True)
    s.add_argument("--mixture", help="default results/mixtures/RUN/mixture.parquet")
    s.add_argument("--ingest", default="results/ingest", help="canonical splits: DIR/DATASET/SPLIT.parquet")
    s = bench.add_parser("audit", help="contamination audit on a 1M-example mixture with planted leaks")
    s.set_defaults(fn=cmd_bench_audit)
    s.add_argument("--examples", type=int, default=1_000_000)
    s.add_argument("--leaks", type=int, default=25)
    s.add_argument("--workdir", help="keep the generated mixture here (default: a temporary directory)")
    s.add_argument("--json", action="store_true")
