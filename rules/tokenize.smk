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
        version=stage_version("train_tokenizer"),
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
        model_config=ancient(run_model_config),  # read only to check the vocabulary: no fact of the packed rows
    output:
        directory("results/packed/{run}"),
    params:
        lengths=contract.lengths(config),
        seed=config["mixture"]["seed"],
        version=stage_version("pack"),
    threads: 4
    # What a training run waits on goes first (as rule audit): a held-out run's pack left waiting for two free
    # cores (behind the base model's training, then its evaluate jobs) started that run's training ~80 s late.
    priority: 20
    log:
        "logs/pack/{run}.log",
    benchmark:
        "benchmarks/pack/{run}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/pack.py"
