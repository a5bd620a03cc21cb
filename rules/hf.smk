# HuggingFace checkpoints (base.hf): import_hf converts the checkpoint once into flanpipe's base format,
# which every run tunes from (at any TP/PP) and the baselines evaluate; export_hf writes each tuned run back
# as an HF dir (results/hf/<run>/) that transformers loads. Part of `all` only with base.hf: a model
# initialised here has no HF tokenizer files to ship, so its export is a target you ask for by name.


if PLAN.hf_base is not None:

    rule import_hf:
        input:
            hf_source_files(),
        output:
            directory(PLAN.model_dir(PLAN.hf_base.name)),
        params:
            src=config["base"]["hf"],
            version=stage_version("import_hf"),
        threads: 1
        log:
            "logs/import_hf/import_hf.log",
        benchmark:
            "benchmarks/import_hf/import_hf.tsv"
        conda:
            CONDA_ENV
        shell:
            "flanpipe import-hf {params.src:q} --out {output:q} > {log} 2>&1"


rule export_hf:
    input:
        unpack(export_inputs),
    output:
        directory("results/hf/{run}"),
    params:
        base=lambda wildcards, input: f"--base {input.base}" if "base" in input.keys() else "",
        version=stage_version("export_hf"),
    threads: 1
    log:
        "logs/export_hf/{run}.log",
    benchmark:
        "benchmarks/export_hf/{run}.tsv"
    conda:
        CONDA_ENV
    shell:
        "flanpipe export-hf {input.model} --out {output} {params.base} > {log} 2>&1"
