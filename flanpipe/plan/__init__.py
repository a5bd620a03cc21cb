"""Planning, on top of every stage: config validation with defaults (config), plan-time checks (checks), runs
and evaluations (runs), the experiment plan the rules and CLI read (experiments), evaluation job grouping
(eval_plan), each rule's tracked facts and operational settings (contract) and the GPU-hours of pending jobs
(cost).

Layer 6: may import every stage below; torch-free, because ``snakemake -n`` imports it. Only the CLI and
the benchmarks (layer 7) stand above it.
"""
