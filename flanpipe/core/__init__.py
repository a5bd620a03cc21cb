"""Torch-free facts every stage reads: names (vocab), the dataset registry, model and training configs with
their arithmetic, the strict YAML loader and atomic writes (io), thread-pool sizing (threads), and the rerun
contract's vocabulary: canonical params, operational settings, stage code versions (rerun).

Layer 0: may import nothing else of flanpipe, and never torch or Megatron, so planning (``snakemake -n``) and
every stage can read these facts cheaply. tests/test_layering.py keeps it so.
"""
