# SentencePiece (trained on a sample of all training shards, unless config gives a .model) and packing.


rule train_tokenizer:
    input:
        tokenizer_shards,
    output:
        "results/tokenizer/spm.model",
    params:
        vocab_size=config["tokenizer"]["vocab_size"],
        sample_size=config["tokenizer"]["sample_size"],
        seed=config["tokenizer"]["seed"],
    threads: 4  # SentencePiece's trainer; Snakemake gives at most --cores
    log:
        "logs/train_tokenizer/train_tokenizer.log",
    benchmark:
        "benchmarks/train_tokenizer/train_tokenizer.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/train_tokenizer.py"


rule pack:
    input:
        mixture="results/mixtures/{run}/mixture.parquet",
        tokenizer=tokenizer_model(),
        model_config=run_model_config,
    output:
        directory("results/packed/{run}"),
    params:
        lengths=config["lengths"],
        seed=config["mixture"]["seed"],
    threads: 4
    log:
        "logs/pack/{run}.log",
    benchmark:
        "benchmarks/pack/{run}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/pack.py"
