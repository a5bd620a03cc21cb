# The main results (tuned vs base per held-out cluster) and the paper's ablations, each a named target:
#   snakemake ablation_clusters | ablation_scale | ablation_instructions | ablation_templates | ablation_options


rule report:
    input:
        # results: the main evaluations; audit__<run>: each trained run's contamination audit (clean subsets)
        unpack(uncertainty_inputs),
    output:
        json="results/summary.json",
        md=report("results/summary.md", caption="../workflow/report/summary_table.rst", category="Summary"),
        figure=report("results/figures/summary.png", caption="../workflow/report/summary.rst", category="Summary"),
    params:
        meta=report_meta(),
        experiment=EXPERIMENT,
        seed=config["mixture"]["seed"],
        published=report_published(),
        version=stage_version("report"),
    threads: 1
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/report.py"


rule ablation:
    input:
        ablation_inputs,
    output:
        json="results/ablations/{ablation}.json",
        figure=report(
            "results/figures/ablation_{ablation}.png",
            caption="../workflow/report/ablation_{ablation}.rst",
            category="Ablations",
        ),
    params:
        meta=ablation_meta,
        experiment=EXPERIMENT,
        version=stage_version("ablation"),
    threads: 1
    log:
        "logs/ablation/{ablation}.log",
    benchmark:
        "benchmarks/ablation/{ablation}.tsv"
    conda:
        CONDA_ENV
    script:
        "../workflow/scripts/ablation.py"


rule ablation_clusters:
    input:
        "results/ablations/clusters.json",


rule ablation_scale:
    input:
        "results/ablations/scale.json",


rule ablation_instructions:
    input:
        "results/ablations/instructions.json",


rule ablation_templates:
    input:
        "results/ablations/templates.json",


rule ablation_options:
    input:
        "results/ablations/options.json",
