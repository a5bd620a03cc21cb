# Generated datasets (embedded default), ingest to canonical Parquet, templated shards.


rule generate_synthetic:
    output:
        expand("results/synthetic/{{synthetic}}/{split}.jsonl", split=SPLITS),
    params:
        sizes={r: config["synthetic"][r] for r in SPLITS},
        seed=config["synthetic"]["seed"],
    threads: 1
    log:
        "logs/generate_synthetic/{synthetic}.log",
    benchmark:
        "benchmarks/generate_synthetic/{synthetic}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/generate_synthetic.py"


# The train role waits for the dataset's canonical validation/test splits: split hygiene compares them.
rule ingest:
    input:
        unpack(ingest_inputs),
    output:
        "results/ingest/{local_dataset}/{split}.parquet",
    params:
        dataset="{local_dataset}",
        bad_rows=config["data"]["bad_rows"],
        split_duplicates=config["data"]["split_duplicates"],
        root=config["data"]["root"],
        hf_cache=config["data"]["hf_cache"],
    threads: 1
    log:
        "logs/ingest/{local_dataset}/{split}.log",
    benchmark:
        "benchmarks/ingest/{local_dataset}/{split}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/ingest.py"


# Pre-flight check of every hub source (flanpipe.data.sources: config, splits and their files, columns,
# label order, hidden labels; no rows read), the first job of a DAG that downloads: a blocking finding
# stops the run before any download. A localrule, like download. Downloads wait for it only once
# (ancient): a changed registry entry reruns the check, not every download.
rule sources_check:
    output:
        table="results/sources/check.md",
        json="results/sources/check.json",
    params:
        entries=hub_source_entries(),
        root=config["data"]["root"],
        hf_cache=config["data"]["hf_cache"],
    threads: 1
    log:
        "logs/sources_check/sources_check.log",
    benchmark:
        "benchmarks/sources_check/sources_check.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/sources_check.py"


# Hub datasets: a localrule, since compute nodes usually have no internet. datasets.load_dataset
# caches under HF_HOME (or FLANPIPE_HF_CACHE); with HF_DATASETS_OFFLINE=1 it reads only that cache.
rule download:
    input:
        unpack(download_inputs),
    output:
        "results/ingest/{hub_dataset}/{split}.parquet",
    params:
        dataset="{hub_dataset}",
        bad_rows=config["data"]["bad_rows"],
        split_duplicates=config["data"]["split_duplicates"],
        root=config["data"]["root"],
        hf_cache=config["data"]["hf_cache"],
    threads: 1
    log:
        "logs/download/{hub_dataset}/{split}.log",
    benchmark:
        "benchmarks/download/{hub_dataset}/{split}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/ingest.py"


# {shard}: instruction mode and template count (natural-all, natural-4, no_template-all, ...), or lm:
# the unlabeled text a base model is pretrained on.
rule render_shard:
    input:
        canonical="results/ingest/{dataset}/train.parquet",
        templates=template_file,
    output:
        "results/shards/{dataset}/train/{shard}.parquet",
    params:
        mode=shard_mode,
        num_templates=shard_num_templates,
        formats=shard_formats,
    threads: 1
    log:
        "logs/render_shard/{dataset}/{shard}.log",
    benchmark:
        "benchmarks/render_shard/{dataset}/{shard}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/render_shard.py"


# {variant}: instruction mode, options block on or off (-noopts), k exemplars (-2shot).
rule render_eval_shard:
    input:
        unpack(eval_shard_inputs),
        templates=template_file,
    output:
        "results/shards/{dataset}/eval/{variant}.parquet",
    params:
        variant=variant_params,
        max_examples=config["eval"]["examples"],
        seed=config["mixture"]["seed"],
    threads: 1
    log:
        "logs/render_eval_shard/{dataset}/{variant}.log",
    benchmark:
        "benchmarks/render_eval_shard/{dataset}/{variant}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/render_eval_shard.py"
