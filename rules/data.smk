# Generated datasets (embedded default), ingest to canonical Parquet, templated shards.


rule generate_synthetic:
    output:
        expand("results/synthetic/{{synthetic}}/{split}.jsonl", split=ROLES),
    params:
        sizes={r: config["synthetic"][r] for r in ROLES},
        seed=config["synthetic"]["seed"],
    log:
        "logs/generate_synthetic/{synthetic}.log",
    benchmark:
        "benchmarks/generate_synthetic/{synthetic}.tsv"
    script:
        "../workflow/scripts/generate_synthetic.py"


rule ingest:
    input:
        raw_inputs,
    output:
        "results/ingest/{local_dataset}/{split}.parquet",
    params:
        dataset="{local_dataset}",
        bad_rows=config["data"]["bad_rows"],
    log:
        "logs/ingest/{local_dataset}/{split}.log",
    benchmark:
        "benchmarks/ingest/{local_dataset}/{split}.tsv"
    script:
        "../workflow/scripts/ingest.py"


# Hub datasets: a localrule, since compute nodes usually have no internet. datasets.load_dataset
# caches under HF_HOME (or FLANPIPE_HF_CACHE); with HF_DATASETS_OFFLINE=1 it reads only that cache.
rule download:
    output:
        "results/ingest/{hub_dataset}/{split}.parquet",
    params:
        dataset="{hub_dataset}",
        bad_rows=config["data"]["bad_rows"],
    log:
        "logs/download/{hub_dataset}/{split}.log",
    benchmark:
        "benchmarks/download/{hub_dataset}/{split}.tsv"
    script:
        "../workflow/scripts/ingest.py"


rule render_shard:
    input:
        canonical="results/ingest/{dataset}/train.parquet",
        templates=template_file,
    output:
        "results/shards/{dataset}/train.parquet",
    params:
        mode=config["templates"]["train_mode"],
        num_templates=config["templates"]["num_templates"],
    log:
        "logs/render_shard/{dataset}.log",
    benchmark:
        "benchmarks/render_shard/{dataset}.tsv"
    script:
        "../workflow/scripts/render_shard.py"


rule render_eval_shard:
    input:
        validation="results/ingest/{dataset}/validation.parquet",
        test="results/ingest/{dataset}/test.parquet",
        templates=template_file,
    output:
        "results/shards/{dataset}/eval.parquet",
    params:
        mode=config["templates"]["eval_mode"],
        max_examples=config["eval"]["examples"],
    log:
        "logs/render_eval_shard/{dataset}.log",
    benchmark:
        "benchmarks/render_eval_shard/{dataset}.tsv"
    script:
        "../workflow/scripts/render_eval_shard.py"
