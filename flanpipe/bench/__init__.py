"""Benchmarks of the pipeline's stages on synthetic workloads (``flanpipe bench ...``).

They drive the same functions as the workflow rules, so a number here is a number for the real DAG;
only the input data is generated.
"""
