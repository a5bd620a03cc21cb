"""The ``flanpipe`` command: one subcommand per workflow rule, calling the same function as the rule.

    flanpipe tasks --json                         the registry (name, cluster, templates, metric)
    flanpipe sources check [--datasets D...]      rule sources_check: resolve every source, exit 1 if blocked
    flanpipe generate-synthetic NAME --out DIR    rule generate_synthetic
    flanpipe ingest DATASET SPLIT --out FILE [--validation F --test F]   rules ingest / download
    flanpipe render-shard DATASET --canonical FILE --out FILE
    flanpipe render-eval-shard DATASET --validation FILE --test FILE --out FILE
    flanpipe mix MIXTURE --out-dir DIR            rule mix (shards from results/shards by default)
    flanpipe train-tokenizer --out FILE SHARD...  rule train_tokenizer
    flanpipe pack --mixture FILE --tokenizer FILE --out DIR [--run RUN]   rule pack
    flanpipe train-spec RUN --out FILE            rule train_spec (the facts; operational keys go to --ops)
    flanpipe train --spec FILE --data DIR --out DIR [--nproc N] [--mpi srun]   rule train, --ops from --config
    flanpipe launch [--mpi srun] --nproc N -- TRAIN_ARGS...   rule train: torchrun, or srun under SLURM
    flanpipe evaluate --model DIR --tokenizer FILE --shard FILE --out FILE
    flanpipe report --json FILE --md FILE RESULT...
    flanpipe templates preview DATASET -n N
    flanpipe plan --model lamda_pt_137b --gpus 128 [--gpu-mem-gib 80] [--json]   TP/PP/DP layout planner
    flanpipe cost [--profile profiles/slurm] [--json] [-- TARGETS]   GPU-hours of the jobs Snakemake would run now
    flanpipe bench train [--json] [--peer]        Megatron GPTModel vs plain PyTorch fwd+bwd tokens/s
                                                  (--peer: whole steps vs transformers' LlamaForCausalLM,
                                                  each in its own process, interleaved, load average printed)
    flanpipe bench data [--json] [--scale S] [--workdir DIR] [--peer]   render/mix/tokenize/pack on a FLAN-sized
                                                  workload (--peer: tokenize + pack vs datasets + TRL bfd)
    flanpipe bench eval [--json] [--workdir DIR] [--peer]   evaluation: per-dataset cache-free vs grouped KV-cache
                                                  jobs (--peer: one task vs lm-evaluation-harness, tiny local Llama)
    flanpipe bench eval-stage RUN_DIR [--json]    a finished DAG run's evaluate jobs: count, summed s, model loads
    flanpipe bench templates [--rows N] [--json]  render rows/s: {field} pattern vs Jinja template kind
    flanpipe templates import --from {promptsource,flan} SOURCE --dataset NAME --out FILE
    flanpipe audit RUN --out FILE                 rule audit: n-gram contamination of a run's mixture (cli_audit)
    flanpipe bench audit [--examples N] [--json]  audit speed and peak RSS on 1M examples with planted leaks

Experiment facts (lengths, caps, seeds) come from ``--config`` (default config/config.yaml), exactly as
the Snakefile reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flanpipe.core.io import resolve_config_path, write_json
from flanpipe.core.vocab import DEFAULT_MODE, SPLITS, EvalVariant, parse_shard_name, shard_name
from flanpipe.plan.config import dataset_spec, load_config

if TYPE_CHECKING:  # flanpipe.plan.experiments imports polars: only after --threads has sized its pool
    from flanpipe.plan.experiments import Plan


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return load_config(resolve_config_path(args.config))


def cmd_tasks(args: argparse.Namespace) -> None:
    from flanpipe.core.registry import load_registry, registry_table
    from flanpipe.data.templates import load_validated

    cfg = _config(args)
    registry = load_registry(args.registry or cfg["registry"])
    counts = {}
    for name, spec in registry.items():
        ts = load_validated(spec)
        counts[name] = (sum(not t.turned_around for t in ts), sum(t.turned_around for t in ts))
    rows = registry_table(registry, counts, by_loader=args.loaders)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['name']:<40} {r['cluster']:<40} {r['n_templates']:>3}+{r['n_turned_around']} {r['metric']}")
    what = "loaders" if args.loaders else "datasets"
    print(f"{len(rows)} {what} ({len(registry)} loaders) in {len({r['cluster'] for r in rows})} clusters")


def cmd_sources_check(args: argparse.Namespace) -> None:
    """Pre-flight check of the experiment's sources (flanpipe.data.sources); exit 1 on a blocking finding."""
    from flanpipe.data.sources import as_json, check_sources, format_table, write_report
    from flanpipe.plan.experiments import plan_experiment

    cfg = _config(args)
    registry = plan_experiment(cfg).registry  # the entries the DAG would ingest, as the rules see them
    unknown = sorted(set(args.datasets or ()) - set(registry))
    if unknown:
        raise ValueError(f"--datasets: {unknown} are not datasets of {args.config}")
    chosen = {n: s for n, s in registry.items() if not args.datasets or n in args.datasets}
    d = cfg["data"]
    checks = check_sources(chosen, Path(d["root"]), d["hf_cache"] or os.environ.get("FLANPIPE_HF_CACHE"))
    if args.out:
        write_report(checks, args.out)
    print(json.dumps(as_json(checks), indent=2) if args.json else format_table(checks).rstrip("\n"))
    if any(c.blocking for c in checks):
        raise SystemExit(1)


def cmd_generate_synthetic(args: argparse.Namespace) -> None:
    from flanpipe.data.synthetic import generate_dataset

    cfg = _config(args)["synthetic"]
    sizes = {r: cfg[r] for r in SPLITS}
    for p in generate_dataset(args.name, Path(args.out), sizes=sizes, seed=cfg["seed"]):
        print(p)


def cmd_ingest(args: argparse.Namespace) -> None:
    from flanpipe.core.registry import spec_from_facts
    from flanpipe.data.ingest import ingest_split
    from flanpipe.plan.contract import ingest_policy, ingest_spec

    cfg = _config(args)
    if args.bad_rows:
        cfg["data"]["bad_rows"] = args.bad_rows
    if args.split_duplicates:
        cfg["data"]["split_duplicates"] = args.split_duplicates
    facts, ops = ingest_spec(cfg, dataset_spec(cfg, args.dataset))  # what rule ingest tracks and uses
    spec = spec_from_facts(facts, defined_in=ops["defined_in"])
    evals = {r: path for r in ("validation", "test") if (path := getattr(args, r)) is not None}
    report = ingest_split(
        spec,
        args.split,
        args.out,
        policy=spec.bad_rows,
        root=Path(ops["root"]),
        hf_cache=ops["hf_cache"],
        eval_splits=evals,
        **ingest_policy(cfg, args.split),
    )
    print(json.dumps(report))


def _render_spec(cfg: dict[str, Any], dataset: str) -> Any:
    """The DatasetSpec rules render_shard / render_eval_shard work from: the entry's render facts."""
    from flanpipe.core.registry import spec_from_facts
    from flanpipe.plan.contract import dataset_render_facts

    full = dataset_spec(cfg, dataset)
    return spec_from_facts(dataset_render_facts(full), defined_in=full.defined_in, templates=full.templates)


def cmd_render_shard(args: argparse.Namespace) -> None:
    from flanpipe.data.templates import render_shard

    cfg = _config(args)
    mode, k = parse_shard_name(args.variant)
    spec = _render_spec(cfg, args.dataset)
    print(json.dumps(render_shard(spec, args.canonical, args.out, mode=mode, num_templates=k)))


def cmd_render_eval_shard(args: argparse.Namespace) -> None:
    from flanpipe.data.templates import render_eval_shard

    cfg = _config(args)
    spec = _render_spec(cfg, args.dataset)
    v = EvalVariant.parse(args.variant)
    report = render_eval_shard(
        spec,
        {"validation": args.validation, "test": args.test},
        args.out,
        mode=v.mode,
        max_examples=cfg["eval"]["examples"],
        options_in_prompt=v.options,
        shots=v.shots,
        train=args.train,
        seed=cfg["mixture"]["seed"],
    )
    print(json.dumps(report))


def _plan(cfg: dict[str, Any], run: str) -> Plan:
    """The plan, after checking it trains ``run`` (the error names the runs it does train)."""
    from flanpipe.plan.experiments import plan_experiment

    plan = plan_experiment(cfg)
    plan.trained_run(run)
    return plan


def cmd_mix(args: argparse.Namespace) -> None:
    from flanpipe.data.mixing import MixtureConfig, bucket_bytes_for, build_mixture

    cfg = _config(args)
    plan = _plan(cfg, args.run)
    shards = {d: Path(p) for d, p in plan.run_shards(args.run, args.shards).items()}
    out = Path(args.out_dir)
    stats = build_mixture(
        shards,
        MixtureConfig(**cfg["mixture"]),
        out / "mixture.parquet",
        out / "mixture.json",
        budget_tokens=plan.budget_tokens(args.run),
        inputs_length=cfg["lengths"]["inputs"],
        targets_length=cfg["lengths"]["targets"],
        bucket_bytes=bucket_bytes_for(args.mem_mb),
    )
    print(json.dumps(stats, indent=2))


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from flanpipe.data.tokenize import train_tokenizer

    t = _config(args)["tokenizer"]
    print(
        train_tokenizer(
            [Path(p) for p in args.shards],
            Path(args.out),
            vocab_size=t["vocab_size"],
            sample_size=t["sample_size"],
            seed=t["seed"],
            num_threads=args.threads,
        )
    )


def pack_model_config(cfg: dict[str, Any], mixture: str | os.PathLike[str], run: str | None = None) -> Path:
    """The model config `flanpipe pack` packs for: the run's own, as rule pack's input (Plan.run_model_config).

    The run is ``--run``, else the directory of ``results/mixtures/<run>/mixture.parquet``; a mixture
    outside such a directory is packed for the config's ``model`` (the main runs' model).
    """
    from flanpipe.plan.experiments import plan_experiment

    plan = plan_experiment(cfg)
    if run is None:
        run = Path(mixture).parent.name
        if run not in plan.mixtures:
            return resolve_config_path(cfg["model"])
    plan.trained_run(run)
    return plan.run_model_config(run)


def cmd_pack(args: argparse.Namespace) -> None:
    from flanpipe.data.packing import pack_mixture

    cfg = _config(args)
    stats = pack_mixture(
        Path(args.mixture),
        Path(args.tokenizer),
        pack_model_config(cfg, args.mixture, args.run),
        Path(args.out),
        lengths=cfg["lengths"],
        seed=cfg["mixture"]["seed"],
        num_threads=args.threads,
    )
    print(json.dumps(stats, indent=2))


def cmd_train_spec(args: argparse.Namespace) -> None:
    cfg = _config(args)
    write_json(args.out, _plan(cfg, args.run).train_spec(args.run))
    print(args.out)


def train_ops_for(cfg: dict[str, Any], world: int) -> dict[str, Any]:
    """What rule train passes as ``--ops`` for ``world`` ranks: the micro-batch follows DP (check_world, as the
    Snakefile does with the profile's tasks), the rest is the config's operational train keys."""
    from flanpipe.plan.config import check_world, train_ops

    check_world(cfg, world, "--nproc")
    return train_ops(cfg)


def cmd_train(args: argparse.Namespace) -> None:
    """Launch the Megatron-Core entry point exactly as rule train does (flanpipe.train.launch.launch)."""
    from flanpipe.core.rerun import Operational
    from flanpipe.train.launch import launch

    ops = str(Operational(train_ops_for(_config(args), args.nproc)))
    train_args = ["--spec", args.spec, "--data", args.data, "--out", args.out, "--ops", ops]
    raise SystemExit(launch(train_args, args.nproc, args.mpi, threads=args.threads))


def cmd_launch(args: argparse.Namespace) -> None:
    from flanpipe.train.launch import launch

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    which = {"module": args.module} if args.module else {}  # default: flanpipe.train.loop
    raise SystemExit(launch(train_args, args.nproc, args.mpi, threads=args.threads, **which))


def cmd_evaluate(args: argparse.Namespace) -> None:
    import polars as pl

    from flanpipe.eval.evaluate import RankConfig, run_evaluation
    from flanpipe.plan.contract import eval_facts

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
        rank=RankConfig(**eval_facts(cfg)),  # as rule evaluate: the eval block's facts (flanpipe.plan.contract)
    )
    print(json.dumps(result, indent=2))


def cmd_report(args: argparse.Namespace) -> None:
    from flanpipe.report.figures import write_report

    write_report(args.results, args.json, args.md)
    print(Path(args.md).read_text(encoding="utf-8"))


def cmd_templates_preview(args: argparse.Namespace) -> None:
    from flanpipe.data.templates import preview

    cfg = _config(args)
    spec = dataset_spec(cfg, args.dataset)
    canonical = Path(args.canonical or f"results/ingest/{args.dataset}/train.parquet")
    if not canonical.exists():
        raise SystemExit(f"{canonical} does not exist: run `snakemake {canonical}` (or `flanpipe ingest`) first")
    print(preview(spec, canonical, args.n))


def cmd_templates_import(args: argparse.Namespace) -> None:
    from flanpipe.data.importers import import_templates
    from flanpipe.data.template_import import parse_field_map

    result = import_templates(
        args.source_format,
        args.source,
        args.dataset,
        args.out,
        field_map=parse_field_map(args.field_map or []),
        sample=args.sample,
        options=args.options,
        turned_around_from=args.turned_around_from,
        force=args.force,
        keep_jinja=args.jinja,
        verbatim=args.verbatim,
        label=args.label,
        label_offset=args.label_offset,
    )
    print(json.dumps({**result.summary(), "out": args.out}, indent=2))


def _model_config_path(name: str) -> Path:
    """A model config file, or a name under config/models/ (``lamda_pt_137b``)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml", ".json") or p.exists():
        return resolve_config_path(p)
    return resolve_config_path(Path("config/models") / f"{name}.yaml")


def cmd_plan(args: argparse.Namespace) -> None:
    from flanpipe.model.hf_format import load_model_file
    from flanpipe.train.planner import Hardware, Workload, format_plan, plan

    path = _model_config_path(args.model)
    hw = Hardware(
        gpus=args.gpus,
        gpu_mem_gib=args.gpu_mem_gib,
        gpus_per_node=args.gpus_per_node,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        reserve_gib=args.reserve_gib,
    )
    wl = Workload(
        batch_tokens=args.batch_tokens,
        seq_length=args.seq_length,
        steps=args.steps,
        distributed_optimizer=args.distributed_optimizer,
    )
    result = plan(load_model_file(path), hw, wl, model_name=Path(path).stem)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


def cmd_cost(args: argparse.Namespace) -> None:
    """Price the train and evaluate jobs `snakemake --summary` says are pending (flanpipe.plan.cost)."""
    import subprocess

    from flanpipe.plan.cost import Pricing, format_cost, plan_cost, profile_gpus
    from flanpipe.plan.experiments import plan_experiment

    cfg = _config(args)
    extra = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    snakemake = Path(sys.executable).parent / "snakemake"
    cmd = [str(snakemake) if snakemake.exists() else "snakemake", "--summary", "--configfile", args.config]
    cmd += ["--profile", args.profile] if args.profile else []
    done = subprocess.run([*cmd, *extra], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"flanpipe cost: {' '.join(cmd + extra)} failed:\n{done.stderr[-3000:]}")
    train_gpus, eval_gpus = profile_gpus(args.profile)
    pricing = Pricing(
        train_gpus=args.train_gpus or train_gpus,
        eval_gpus=args.eval_gpus or eval_gpus,
        gpu_mem_gib=args.gpu_mem_gib,
        mfu=args.mfu,
        peak_tflops=args.peak_tflops,
    )
    cost = plan_cost(plan_experiment(cfg), done.stdout, pricing)
    print(json.dumps(cost, indent=2) if args.json else format_cost(cost))


def cmd_bench_data(args: argparse.Namespace) -> None:
    from flanpipe.bench.data import main as bench_data

    bench_data(args.scale, args.workdir, args.json, peer=args.peer)


def cmd_bench_templates(args: argparse.Namespace) -> None:
    from flanpipe.bench.templates import main as bench_templates

    bench_templates(args.rows, args.json)


def cmd_bench_train(args: argparse.Namespace) -> None:
    from flanpipe.bench.train import bench_model_from, bench_train

    overrides = {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": args.heads}
    if args.hidden is not None and args.ffn is None:
        overrides["ffn_hidden_size"] = 4 * args.hidden
    if args.ffn is not None:
        overrides["ffn_hidden_size"] = args.ffn
    if args.peer:
        _bench_train_peer(args, overrides)
        return
    cfg = bench_model_from(args.model, overrides)
    result = bench_train(
        cfg, batch_size=args.batch_size, seq_length=args.seq_length, iters=args.iters or 20, warmup=args.warmup
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    t = result["timings"]
    print(f"{result['params'] / 1e6:.2f}M params, {result['tokens_per_iter']} tokens/iter, {result['threads']} threads")
    for name, row in t.items():
        print(f"{name:<11} {row['tokens_per_s']:>10.0f} tokens/s  {row['s_per_iter_median'] * 1e3:>8.1f} ms/iter")
    print(f"plain / megatron = {result['ratio_plain_over_megatron']:.2f}; losses {result['loss']}")


def _bench_train_peer(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """``bench train --peer``: flanpipe's Megatron training step vs transformers' LlamaForCausalLM."""
    from flanpipe.bench.peer_train import LLAMA_BENCH, bench_train_peer, missing_peer_packages
    from flanpipe.bench.train import bench_model_from

    missing = missing_peer_packages()
    if missing:
        print(
            f"flanpipe bench train --peer: the peer needs {', '.join(missing)}, not installed here "
            "(pip install 'flanpipe[bench]')",
            file=sys.stderr,
        )
        raise SystemExit(3)
    cfg = bench_model_from(args.model, overrides, base=LLAMA_BENCH)
    r = bench_train_peer(
        cfg,
        batch_size=args.batch_size,
        seq_length=args.seq_length,
        iters=args.iters or 30,
        warmup=args.warmup,
        threads=args.threads,
        same_heap=args.same_heap,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return
    m, load = r["model"], r["loadavg_1m"]
    print(
        f"Llama-shaped: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
        f"SwiGLU {m['ffn_hidden_size']}, vocab {m['vocab_size']}; {r['params_flanpipe']:,} params "
        f"(HF {r['params_hf']:,}); batch {r['batch_size']} x {r['seq_length']} = micro {r['micro_batch_size']} "
        f"x {r['accumulation']}; AdamW + clip 1.0; {r['threads']} threads; each side in its own process, "
        f"{r['iters']} steps each, interleaved{'; same heap settings on both sides' if r['same_heap'] else ''}"
    )
    for name, row in r["timings"].items():
        print(
            f"  {name:<9} {row['tokens_per_s_median']:>9.0f} tokens/s at the median step "
            f"({row['s_per_iter_median'] * 1e3:.1f} ms; CPU {row['cpu_s_per_step_median'] * 1e3:.1f} ms, "
            f"of it kernel {row['sys_s_per_step_median'] * 1e3:.1f} ms; "
            f"{row['minor_faults_per_step_median']:,.0f} page faults/step)"
        )
    q1, q3 = r["ratio_paired_quartiles"][0], r["ratio_paired_quartiles"][-1]
    print(
        f"  flanpipe / HF = {r['ratio_paired_median']:.3f} (median of per-round ratios; quartiles {q1:.3f}-{q3:.3f}); "
        f"median steps {r['ratio_flanpipe_over_hf_median']:.3f}; CPU time {r['ratio_cpu_median']:.3f}"
    )
    print(f"  load average (1 min): {load['start']} start, {load['mean']} mean, {load['max']} max, {load['end']} end")
    print(f"  first-step loss {r['first_step_loss']}; HF attention: {r['hf_attention']}")
    print("  differs: " + "; ".join(r["differences"]))


def cmd_bench_dag(args: argparse.Namespace) -> None:
    from flanpipe.bench.dag import main as bench_dag

    # no --config (nor FLANPIPE_CONFIG): the default and flan137b on the fixture mirror, side by side
    default = args.config == "config/config.yaml" and "FLANPIPE_CONFIG" not in os.environ
    bench_dag(None if default else str(resolve_config_path(args.config)), args.targets, args.json)


def cmd_bench_eval(args: argparse.Namespace) -> None:
    if args.peer:
        from flanpipe.bench.peer_eval import main as bench_eval_peer
        from flanpipe.bench.peer_eval import missing_peer_packages

        missing = missing_peer_packages()
        if missing:
            print(
                f"flanpipe bench eval --peer: the peer needs {', '.join(missing)}, not installed here "
                "(pip install 'flanpipe[bench]')",
                file=sys.stderr,
            )
            raise SystemExit(3)
        bench_eval_peer(args.examples, args.rounds, args.batch_size, args.json, args.peer_workdir)
        return
    from flanpipe.bench.eval import main as bench_eval

    bench_eval(args.workdir, args.config, args.gen_rows, args.max_groups, args.json)


def cmd_bench_eval_stage(args: argparse.Namespace) -> None:
    from flanpipe.bench.eval_stage import main as bench_eval_stage

    bench_eval_stage(Path(args.run_dir), args.json)


def cmd_bench_adafactor(args: argparse.Namespace) -> None:
    from flanpipe.bench.adafactor import main as bench_adafactor

    bench_adafactor(args.spec, args.data, args.steps, args.lr, args.threads or 1, args.json)


def cmd_import_hf(args: argparse.Namespace) -> None:
    from flanpipe.model.hf_import import import_hf

    cfg = import_hf(args.hf_dir, args.out)
    rows = f"vocab {cfg.tokenizer_vocab_size} (rows {cfg.vocab_size})"
    print(f"{args.hf_dir} -> {args.out}: {cfg.num_layers} layers, {rows}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    from flanpipe.model.hf_export import export_hf

    shard = int(args.max_shard_gb * 2**30)
    print(export_hf(args.run_dir, args.out, base=args.base, max_shard_bytes=shard, force=args.force))


def cmd_bench_import_hf(args: argparse.Namespace) -> None:
    from flanpipe.bench.import_hf import main as bench_import_hf

    shape = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")}
    bench_import_hf(as_json=args.json, **shape)


def build_parser() -> argparse.ArgumentParser:
    """The command table: one subparser per rule and tool (long, but flat: a table, not logic)."""
    p = argparse.ArgumentParser(prog="flanpipe", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        default=os.environ.get("FLANPIPE_CONFIG", "config/config.yaml"),
        help="experiment config (default config/config.yaml)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="cores this command may use: Polars, torch and SentencePiece pools, and for train/launch the "
        "job's threads split over its ranks (default: OMP_NUM_THREADS, else every core)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:  # noqa: A002, ANN001
        sp = sub.add_parser(name, help=help)
        sp.set_defaults(fn=fn)
        return sp

    s = add("tasks", cmd_tasks, "print the task registry")
    s.add_argument("--json", action="store_true")
    s.add_argument("--registry", nargs="*", help="registry files (default: the config's)")
    s.add_argument("--loaders", action="store_true", help="one row per loader (ANLI R1-R3 apart), not per dataset")
    src = sub.add_parser("sources", help="source tools").add_subparsers(dest="sources_command", required=True)
    s = src.add_parser("check", help="pre-flight check of every source (no rows read); exit 1 on a blocking finding")
    s.set_defaults(fn=cmd_sources_check)
    s.add_argument("--datasets", nargs="+", help="only these datasets (default: the config's)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--out", help="also write the table to OUT and the findings to OUT with suffix .json")
    s = add("generate-synthetic", cmd_generate_synthetic, "write one generated dataset's splits")
    s.add_argument("name")
    s.add_argument("--out", required=True)
    s = add("ingest", cmd_ingest, "raw split -> canonical Parquet")
    s.add_argument("dataset")
    s.add_argument("split", choices=list(SPLITS))
    s.add_argument("--out", required=True)
    s.add_argument("--bad-rows", choices=["fail", "drop"])
    s.add_argument("--validation", help="train only: the canonical validation split, for split hygiene")
    s.add_argument("--test", help="train only: the canonical test split, for split hygiene")
    s.add_argument("--split-duplicates", choices=["fail", "drop", "warn"], help="default: config data.split_duplicates")
    s = add("render-shard", cmd_render_shard, "canonical train split -> templated shard")
    s.add_argument("dataset")
    s.add_argument("--canonical", required=True)
    s.add_argument("--out", required=True)
    s.add_argument(
        "--variant", default=shard_name(DEFAULT_MODE, None), help="MODE-K: natural-all, natural-4, no_template-all, lm"
    )
    s = add("render-eval-shard", cmd_render_eval_shard, "validation+test -> eval shard (every template)")
    s.add_argument("dataset")
    s.add_argument("--validation", required=True)
    s.add_argument("--test", required=True)
    s.add_argument("--out", required=True)
    s.add_argument(
        "--variant", default=EvalVariant().name, help="natural, natural-noopts, natural-2shot, no_template ..."
    )
    s.add_argument("--train", help="canonical train split (few-shot exemplars)")
    s = add("mix", cmd_mix, "capped, examples-proportional mixture of one run")
    s.add_argument("run")
    s.add_argument("--shards", default="results/shards")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--mem-mb", type=int, help="job memory the shuffle is sized for (default: 128 MiB buckets)")
    s = add("train-tokenizer", cmd_train_tokenizer, "SentencePiece BPE on a sample of shards")
    s.add_argument("--out", required=True)
    s.add_argument("shards", nargs="+")
    s = add("pack", cmd_pack, "tokenize + pack one run's mixture into Megatron IndexedDatasets")
    s.add_argument("--mixture", required=True)
    s.add_argument("--run", help="whose model config to pack for (default: the mixture's directory name)")
    s.add_argument("--tokenizer", required=True, help="SentencePiece .model or checkpoint tokenizer dir")
    s.add_argument("--out", required=True)
    s = add("train-spec", cmd_train_spec, "write the training run spec JSON of one run (what changes its weights)")
    s.add_argument("run")
    s.add_argument("--out", required=True)
    s = add("train", cmd_train, "Megatron-Core training (torchrun, or srun with --mpi)")
    s.add_argument("--spec", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--nproc", type=int, default=1)
    s.add_argument("--mpi", default="", help="e.g. srun: one task per rank (default: torchrun --standalone)")
    s = add("launch", cmd_launch, "start training ranks: torchrun, or `MPI -n N` under SLURM")
    s.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc_per_node, or srun -n)")
    s.add_argument("--mpi", default="", help="e.g. srun; empty: torchrun --standalone")
    s.add_argument(
        "--module", help="ranks run this module's main (flanpipe.eval.evaluate); default flanpipe.train.loop"
    )
    s.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then flanpipe.train.loop's --spec/--data/--out")
    from flanpipe.train.launch import SITE_ENV  # stdlib-only module: cheap at parser build

    s.formatter_class = argparse.RawDescriptionHelpFormatter
    s.epilog = "under srun, from the allocation unless the environment sets:\n" + "\n".join(
        f"  {name}: {what}" for name, what in SITE_ENV.items()
    )
    s = add("evaluate", cmd_evaluate, "zero-shot evaluation of one dataset")
    s.add_argument("--model", required=True)
    s.add_argument("--tokenizer", required=True, help="SentencePiece .model or checkpoint tokenizer dir")
    s.add_argument("--shard", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--metric", help="default: the dataset's metric in the registry")
    s = add("report", cmd_report, "summary.json + summary.md from eval results")
    s.add_argument("--json", required=True)
    s.add_argument("--md", required=True)
    s.add_argument("results", nargs="+")
    s = add("cost", cmd_cost, "GPU-hours of the train and evaluate jobs Snakemake would run now (before submitting)")
    s.add_argument("--profile", help="Snakemake profile: its set-resources give each job's GPUs (train/evaluate)")
    s.add_argument("--train-gpus", type=int, help="GPUs per training job (default: the profile's, else TP x PP)")
    s.add_argument("--eval-gpus", type=int, help="GPUs per evaluation job (default: the profile's, else TP x PP)")
    s.add_argument("--gpu-mem-gib", type=float, default=80.0)
    s.add_argument("--mfu", type=float, default=0.4, help="fraction of peak achieved (planner default 0.4)")
    s.add_argument("--peak-tflops", type=float, help="per GPU (default: the config's train.peak_tflops)")
    s.add_argument("--json", action="store_true")
    s.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="-- then snakemake targets/options")
    t = sub.add_parser("templates", help="template tools").add_subparsers(dest="templates_command", required=True)
    s = t.add_parser("preview", help="print N rendered examples under each template")
    s.set_defaults(fn=cmd_templates_preview)
    s.add_argument("dataset")
    s.add_argument("-n", type=int, default=2)
    s.add_argument("--canonical", help="canonical Parquet (default results/ingest/DATASET/train.parquet)")
    s = t.add_parser("import", help="promptsource/P3 templates.yaml or FLAN PATTERNS -> a template file")
    s.set_defaults(fn=cmd_templates_import)
    s.add_argument("--from", dest="source_format", required=True, choices=["promptsource", "flan"])
    s.add_argument("source", help="promptsource: templates root or a templates.yaml; flan: a .py PATTERNS file")
    s.add_argument("--dataset", required=True, help="promptsource: DATASET[/SUBSET]; flan: the PATTERNS key")
    s.add_argument("--out", required=True, help="template file to write, e.g. config/templates/NAME.yaml")
    s.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    s.add_argument("--field-map", nargs="+", action="extend", metavar="OLD=NEW", help="rename source variables")
    s.add_argument("--sample", help="promptsource: JSONL records (source column names) to check conversions on")
    s.add_argument("--options", nargs="+", help="promptsource: the registry's options (default: most common)")
    s.add_argument("--turned-around-from", type=int, metavar="K", help="flan: templates K.. are turned around")
    s.add_argument(
        "--jinja", action="store_true", help="promptsource: keep templates that are not plain substitutions verbatim"
    )
    s.add_argument("--verbatim", action="store_true", help="promptsource: keep every template as written (T0's eval)")
    s.add_argument("--label", help="promptsource: the variable holding the source label (default: detected)")
    s.add_argument("--label-offset", type=int, default=0, help="promptsource: the source label counts from this")
    s = add("plan", cmd_plan, "TP x PP x DP layout: memory per GPU, bubble, step time, hours")
    s.add_argument("--model", required=True, help="config/models/NAME.yaml name, or a config path")
    s.add_argument("--gpus", type=int, required=True)
    s.add_argument("--gpu-mem-gib", type=float, default=80.0)
    s.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node")
    s.add_argument("--batch-tokens", type=int, default=8192, help="packed tokens per step (FLAN: 8192)")
    s.add_argument("--seq-length", type=int, default=1024, help="tokens per packed row (must divide the batch)")
    s.add_argument("--mfu", type=float, default=0.4)
    s.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, dense bf16 (H100 SXM: 989)")
    s.add_argument("--steps", type=int, default=30000)
    s.add_argument("--reserve-gib", type=float, default=0.0, help="memory kept free per GPU")
    s.add_argument("--distributed-optimizer", action="store_true", help="shard master weights + state over DP")
    s.add_argument("--json", action="store_true")
    s = add("import-hf", cmd_import_hf, "HF checkpoint dir (Llama/Qwen2/GPT-2 safetensors) -> model.json + checkpoint/")
    s.add_argument("hf_dir")
    s.add_argument("--out", required=True)
    s = add("export-hf", cmd_export_hf, "model dir (model.json + checkpoint/) -> HF dir from_pretrained loads")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--base", help="imported base dir with the tokenizer files (default: RUN_DIR)")
    s.add_argument("--max-shard-gb", type=float, default=5.0)
    s.add_argument("--force", action="store_true", help="replace an earlier export in --out (default: refuse)")
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    s = bench.add_parser("data", help="render -> mix -> tokenize -> pack on 62 synthetic FLAN-shaped datasets")
    s.set_defaults(fn=cmd_bench_data)
    s.add_argument("--scale", type=float, default=1.0, help="1.0: >= 1M mixed examples; 0.005: seconds")
    s.add_argument("--workdir", help="keep intermediates here (default: a temporary directory)")
    s.add_argument("--peer", action="store_true", help="also tokenize + pack with datasets map + TRL bfd packing")
    s.add_argument("--json", action="store_true")
    s = bench.add_parser("templates", help="render rows/s: {field} pattern (Polars) vs Jinja (row-wise sandbox)")
    s.set_defaults(fn=cmd_bench_templates)
    s.add_argument("--rows", type=int, default=100_000)
    s.add_argument("--json", action="store_true")
    s = bench.add_parser("dag", help="wall time of `snakemake -n` for an experiment config (planning cost)")
    s.set_defaults(fn=cmd_bench_dag)
    s.add_argument("targets", nargs="*", help="Snakemake targets (default: all)")
    s.add_argument("--json", action="store_true")
    s = bench.add_parser("eval", help="evaluation before/after: per-dataset cache-free jobs vs grouped KV-cache jobs")
    s.set_defaults(fn=cmd_bench_eval)
    s.add_argument("--workdir", default=".", help="where snakemake built the models and eval shards (default .)")
    s.add_argument("--gen-rows", type=int, default=16, help="rows per dataset decoded greedily (generation)")
    s.add_argument("--max-groups", type=int, help="only the first N evaluation jobs (default all)")
    peer_help = "instead: one BBH-style task on a tiny local Llama, flanpipe vs lm-evaluation-harness"
    s.add_argument("--peer", action="store_true", help=peer_help)
    s.add_argument("--examples", type=int, default=300, help="--peer: examples in the task (default 300)")
    s.add_argument("--rounds", type=int, default=3, help="--peer: timed runs of each harness, alternating")
    s.add_argument("--batch-size", type=int, default=32, help="--peer: both harnesses' batch size (default 32)")
    s.add_argument("--peer-workdir", help="--peer: keep the model, task and outputs here (default: a temp dir)")
    s.add_argument("--json", action="store_true")
    s = bench.add_parser("eval-stage", help="a finished DAG run's evaluate jobs: count, summed s, model loads")
    s.set_defaults(fn=cmd_bench_eval_stage)
    s.add_argument("run_dir", help="the directory snakemake ran in (benchmarks/, results/ under it)")
    s.add_argument("--json", action="store_true")
    s = bench.add_parser("train", help="Megatron GPTModel vs plain PyTorch: fwd+bwd tokens/s, same weights")
    s.set_defaults(fn=cmd_bench_train)
    s.add_argument("--model", help="model config (default: 4 layers, hidden 256, vocab 4096)")
    s.add_argument("--layers", type=int)
    s.add_argument("--hidden", type=int)
    s.add_argument("--heads", type=int)
    s.add_argument("--ffn", type=int, help="default 4 x --hidden when --hidden is given")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seq-length", type=int, default=256)
    s.add_argument("--iters", type=int, help="timed iterations per side (default 20; --peer: 30, for a stable median)")
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--peer", action="store_true", help="whole AdamW steps vs transformers' LlamaForCausalLM")
    s.add_argument("--threads", type=int, help="--peer: torch threads of each side (default: every core)")
    s.add_argument(
        "--same-heap", action="store_true", help="--peer: the peer's process gets flanpipe's allocator settings too"
    )
    s.add_argument("--json", action="store_true")
    s = bench.add_parser("import-hf", help="peak RSS of import-hf vs the size of a generated >= 2 GB checkpoint")
    s.set_defaults(fn=cmd_bench_import_hf)
    s.add_argument("--layers", type=int, default=20)
    s.add_argument("--hidden", type=int, default=2048)
    s.add_argument("--heads", type=int, default=16)
    s.add_argument("--kv-heads", type=int, default=8)
    s.add_argument("--ffn", type=int, default=5632)
    s.add_argument(
        "--vocab", type=int, default=32000, help="e.g. Llama 3 8B: --hidden 4096 --ffn 14336 --vocab 128256 --heads 32"
    )
    s.add_argument("--json", action="store_true")
    s = bench.add_parser("adafactor", help="tune one base with each Adafactor setting: loss at start and end")
    s.set_defaults(fn=cmd_bench_adafactor)
    s.add_argument("--spec", required=True, help="a tuned run's spec (results/specs/RUN.json, init_checkpoint set)")
    s.add_argument("--data", required=True, help="its packed data (results/packed/RUN)")
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--lr", type=float, default=3e-5, help="FLAN's")
    s.add_argument("--json", action="store_true")
    from flanpipe.cli_audit import add_audit_commands  # flanpipe audit, flanpipe bench audit

    add_audit_commands(sub, bench)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:  # before any subcommand imports polars or torch: their pools are sized at import
        from flanpipe.core.threads import limit_threads

        limit_threads(args.threads)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # our errors name their culprit: no traceback needed
        print(f"flanpipe: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
