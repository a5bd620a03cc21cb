"""The ``flanpipe`` command: one subcommand per workflow rule, calling the same function as the rule.

    flanpipe tasks --json                         the registry (name, cluster, templates, metric)
    flanpipe generate-synthetic NAME --out DIR    rule generate_synthetic
    flanpipe ingest DATASET SPLIT --out FILE      rule ingest
    flanpipe render-shard DATASET --canonical FILE --out FILE
    flanpipe render-eval-shard DATASET --validation FILE --test FILE --out FILE
    flanpipe mix MIXTURE --out-dir DIR            rule mix (shards from results/shards by default)
    flanpipe train-tokenizer --out FILE SHARD...  rule train_tokenizer
    flanpipe pack --mixture FILE --tokenizer FILE --out DIR
    flanpipe train --spec FILE --data DIR --out DIR [--nproc N]   (torchrun)
    flanpipe evaluate --model DIR --tokenizer FILE --shard FILE --out FILE
    flanpipe report --json FILE --md FILE RESULT...
    flanpipe templates preview DATASET -n N

Experiment facts (lengths, caps, seeds) come from ``--config`` (default config/config.yaml), exactly as
the Snakefile reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from flanpipe.config import (
    ConfigError,
    budget_tokens,
    dataset_spec,
    load_config,
    plan_experiment,
    train_spec,
)
from flanpipe.io import read_yaml, resolve_config_path, write_json


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return load_config(resolve_config_path(args.config))


def cmd_tasks(args: argparse.Namespace) -> None:
    from flanpipe.registry import load_registry, registry_table
    from flanpipe.templates import load_validated

    cfg = _config(args)
    registry = load_registry(args.registry or cfg["registry"])
    counts = {}
    for name, spec in registry.items():
        ts = load_validated(spec)
        counts[name] = (sum(not t.turned_around for t in ts), sum(t.turned_around for t in ts))
    rows = registry_table(registry, counts)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['name']:<40} {r['cluster']:<40} {r['n_templates']:>3}+{r['n_turned_around']} {r['metric']}")
    print(f"{len(rows)} datasets in {len({r['cluster'] for r in rows})} clusters")


def cmd_generate_synthetic(args: argparse.Namespace) -> None:
    from flanpipe.synthetic import generate_dataset

    cfg = _config(args)["synthetic"]
    sizes = {r: cfg[r] for r in ("train", "validation", "test")}
    for p in generate_dataset(args.name, Path(args.out), sizes=sizes, seed=cfg["seed"]):
        print(p)


def cmd_ingest(args: argparse.Namespace) -> None:
    from flanpipe.ingest import ingest_split

    cfg = _config(args)
    spec = dataset_spec(cfg, args.dataset)
    print(json.dumps(ingest_split(spec, args.split, args.out, policy=args.bad_rows or cfg["data"]["bad_rows"])))


def cmd_render_shard(args: argparse.Namespace) -> None:
    from flanpipe.templates import render_shard

    cfg = _config(args)
    t = cfg["templates"]
    spec = dataset_spec(cfg, args.dataset)
    print(
        json.dumps(render_shard(spec, args.canonical, args.out, mode=t["train_mode"], num_templates=t["num_templates"]))
    )


def cmd_render_eval_shard(args: argparse.Namespace) -> None:
    from flanpipe.templates import render_eval_shard

    cfg = _config(args)
    spec = dataset_spec(cfg, args.dataset)
    splits = {"validation": args.validation, "test": args.test}
    print(
        json.dumps(
            render_eval_shard(
                spec, splits, args.out, mode=cfg["templates"]["eval_mode"], max_examples=cfg["eval"]["examples"]
            )
        )
    )


def cmd_mix(args: argparse.Namespace) -> None:
    from flanpipe.mixing import MixtureConfig, build_mixture

    cfg = _config(args)
    plan = plan_experiment(cfg)
    if args.mixture not in plan.mixtures:
        raise ConfigError(f"unknown mixture {args.mixture!r}; this config defines {sorted(plan.mixtures)}")
    shards = {d: Path(args.shards) / d / "train.parquet" for d in plan.mixtures[args.mixture]}
    out = Path(args.out_dir)
    stats = build_mixture(
        shards,
        MixtureConfig(**cfg["mixture"]),
        out / "mixture.parquet",
        out / "mixture.json",
        budget_tokens=budget_tokens(cfg),
        inputs_length=cfg["lengths"]["inputs"],
        targets_length=cfg["lengths"]["targets"],
    )
    print(json.dumps(stats, indent=2))


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from flanpipe.tokenize import train_tokenizer

    t = _config(args)["tokenizer"]
    print(
        train_tokenizer(
            [Path(p) for p in args.shards],
            Path(args.out),
            vocab_size=t["vocab_size"],
            sample_size=t["sample_size"],
            seed=t["seed"],
        )
    )


def cmd_pack(args: argparse.Namespace) -> None:
    from flanpipe.packing import pack_mixture

    cfg = _config(args)
    stats = pack_mixture(
        Path(args.mixture),
        Path(args.tokenizer),
        resolve_config_path(cfg["model"]),
        Path(args.out),
        lengths=cfg["lengths"],
        seed=cfg["mixture"]["seed"],
    )
    print(json.dumps(stats, indent=2))


def cmd_train_spec(args: argparse.Namespace) -> None:
    cfg = _config(args)
    write_json(args.out, train_spec(cfg, read_yaml(resolve_config_path(cfg["model"]))))
    print(args.out)


def cmd_train(args: argparse.Namespace) -> None:
    """Launch the Megatron-Core entry point under torchrun (the rule runs the same command)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(args.nproc),
        "-m",
        "flanpipe.train",
        "--spec",
        args.spec,
        "--data",
        args.data,
        "--out",
        args.out,
    ]
    raise SystemExit(subprocess.call(cmd))


def cmd_evaluate(args: argparse.Namespace) -> None:
    import polars as pl

    from flanpipe.evaluate import run_evaluation

    cfg = _config(args)
    dataset = pl.scan_parquet(args.shard).select(pl.col("dataset").first()).collect().item()
    result = run_evaluation(
        Path(args.model),
        Path(args.tokenizer),
        Path(args.shard),
        Path(args.out),
        metric=args.metric or dataset_spec(cfg, dataset).metric,
        lengths=cfg["lengths"],
        batch_size=cfg["eval"]["batch_size"],
    )
    print(json.dumps(result, indent=2))


def cmd_report(args: argparse.Namespace) -> None:
    from flanpipe.report import write_report

    write_report(args.results, args.json, args.md)
    print(Path(args.md).read_text(encoding="utf-8"))


def cmd_templates_preview(args: argparse.Namespace) -> None:
    from flanpipe.templates import preview

    cfg = _config(args)
    spec = dataset_spec(cfg, args.dataset)
    canonical = Path(args.canonical or f"results/ingest/{args.dataset}/train.parquet")
    if not canonical.exists():
        raise SystemExit(f"{canonical} does not exist: run `snakemake {canonical}` (or `flanpipe ingest`) first")
    print(preview(spec, canonical, args.n))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flanpipe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        default=os.environ.get("FLANPIPE_CONFIG", "config/config.yaml"),
        help="experiment config (default config/config.yaml)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:  # noqa: A002, ANN001
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(fn=fn)
        return sp

    s = add("tasks", cmd_tasks, "print the task registry")
    s.add_argument("--json", action="store_true")
    s.add_argument("--registry", nargs="*", help="registry files (default: the config's)")
    s = add("generate-synthetic", cmd_generate_synthetic, "write one generated dataset's splits")
    s.add_argument("name")
    s.add_argument("--out", required=True)
    s = add("ingest", cmd_ingest, "raw split -> canonical Parquet")
    s.add_argument("dataset")
    s.add_argument("split", choices=["train", "validation", "test"])
    s.add_argument("--out", required=True)
    s.add_argument("--bad-rows", choices=["fail", "drop"])
    s = add("render-shard", cmd_render_shard, "canonical train split -> templated shard")
    s.add_argument("dataset")
    s.add_argument("--canonical", required=True)
    s.add_argument("--out", required=True)
    s = add("render-eval-shard", cmd_render_eval_shard, "validation+test -> eval shard (every template)")
    s.add_argument("dataset")
    s.add_argument("--validation", required=True)
    s.add_argument("--test", required=True)
    s.add_argument("--out", required=True)
    s = add("mix", cmd_mix, "capped, examples-proportional mixture")
    s.add_argument("mixture")
    s.add_argument("--shards", default="results/shards")
    s.add_argument("--out-dir", required=True)
    s = add("train-tokenizer", cmd_train_tokenizer, "SentencePiece BPE on a sample of shards")
    s.add_argument("--out", required=True)
    s.add_argument("shards", nargs="+")
    s = add("pack", cmd_pack, "tokenize + pack a mixture into Megatron IndexedDatasets")
    s.add_argument("--mixture", required=True)
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--out", required=True)
    s = add("train-spec", cmd_train_spec, "write the training run spec JSON")
    s.add_argument("--out", required=True)
    s = add("train", cmd_train, "Megatron-Core training under torchrun")
    s.add_argument("--spec", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--nproc", type=int, default=1)
    s = add("evaluate", cmd_evaluate, "zero-shot evaluation of one dataset")
    s.add_argument("--model", required=True)
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--shard", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--metric", help="default: the dataset's metric in the registry")
    s = add("report", cmd_report, "summary.json + summary.md from eval results")
    s.add_argument("--json", required=True)
    s.add_argument("--md", required=True)
    s.add_argument("results", nargs="+")
    t = sub.add_parser("templates", help="template tools").add_subparsers(dest="templates_command", required=True)
    s = t.add_parser("preview", help="print N rendered examples under each template")
    s.set_defaults(fn=cmd_templates_preview)
    s.add_argument("dataset")
    s.add_argument("-n", type=int, default=2)
    s.add_argument("--canonical", help="canonical Parquet (default results/ingest/DATASET/train.parquet)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # our errors name their culprit: no traceback needed
        print(f"flanpipe: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
