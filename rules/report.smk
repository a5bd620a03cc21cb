# Per held-out cluster, per dataset: metric, score per template, mean, best-dev template.


rule report:
    input:
        all_eval_results(),
    output:
        json="results/summary.json",
        md="results/summary.md",
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    script:
        "../workflow/scripts/report.py"
