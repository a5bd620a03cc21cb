# SentencePiece (trained on a sample of all training shards, unless config gives a .model) and packing.


rule train_tokenizer:
    input:
        all_train_shards,
    output:
        "results/tokenizer/spm.model",
    params:
        vocab_size=config["tokenizer"]["vocab_size"],
        sample_size=config["tokenizer"]["sample_size"],
        seed=config["tokenizer"]["seed"],
    log:
        "logs/train_tokenizer/train_tokenizer.log",
    benchmark:
        "benchmarks/train_tokenizer/train_tokenizer.tsv"
    script:
        "../workflow/scripts/train_tokenizer.py"


rule pack:
    input:
        mixture="results/mixtures/{mixture}/mixture.parquet",
        tokenizer=tokenizer_model(),
        model_config=str(MODEL_CONFIG),
    output:
        directory("results/packed/{mixture}"),
    params:
        lengths=config["lengths"],
        seed=config["mixture"]["seed"],
    log:
        "logs/pack/{mixture}.log",
    benchmark:
        "benchmarks/pack/{mixture}.tsv"
    script:
        "../workflow/scripts/pack.py"
