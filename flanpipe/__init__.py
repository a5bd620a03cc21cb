"""flanpipe: FLAN-style instruction tuning as a reproducible DAG.

Every stage of the workflow is a plain function in this package; Snakemake rules and the
``flanpipe`` CLI are thin callers of the same functions, so any step can be run and tested by hand.
"""

__version__ = "0.1.0"
