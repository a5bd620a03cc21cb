"""The data stage, raw splits to packed rows: the pre-flight check of the sources, synthetic datasets, ingest to
canonical parquet, templates (``{field}`` patterns, Jinja/P3) and their importers, Flan 2022 prompt formats,
capped mixing, the tokenizer and the encoding rule, best-fit packing, the contamination audit, provenance and
the trainer's row order.

Layer 1: may import ``core`` only. Torch-free at import (Polars, SentencePiece, tokenizers); the packer
imports Megatron's IndexedDatasetBuilder only when it writes.
"""
