"""Rule uncertainty -> flanpipe.report.uncertainty.write_uncertainty."""

from flanpipe.core.threads import limit_threads

# First, before Polars/torch load: their pools are sized once, at import, to the job's threads.
limit_threads(snakemake.threads)  # noqa: F821 (injected by Snakemake)

from flanpipe.core.io import log_to
from flanpipe.report.uncertainty import write_uncertainty

snakemake = snakemake  # noqa: F821,PLW0127 (injected by Snakemake)

with log_to(snakemake.log[0]):
    audits = {k.partition("__")[2]: v for k, v in snakemake.input.items() if k.startswith("audit__")}
    report = write_uncertainty(
        list(snakemake.input.results),
        snakemake.params.meta,
        audits,
        snakemake.output.json,
        snakemake.output.md,
        n_boot=snakemake.params.n_boot,
        seed=snakemake.params.seed,
    )
    print(f"{len(report['evaluations'])} evaluations, {len(report['tuned_vs_base'])} tuned-vs-base comparisons")
