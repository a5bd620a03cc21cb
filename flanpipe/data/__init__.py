"""The data stage, raw splits to packed rows: the pre-flight check of the sources, synthetic datasets, ingest to
canonical parquet, templates (``{field}`` patterns, Jinja/P3) and their importers, Flan 2022 prompt formats,
capped mixing, the tokenizer and the encoding rule, best-fit packing, the contamination audit, provenance and
the trainer's row order.

Layer 1: may import ``core`` only. Torch-free (Polars, SentencePiece, tokenizers); the packer writes
Megatron's IndexedDataset files itself (flanpipe.data.packing.IndexedRowsWriter).
"""
