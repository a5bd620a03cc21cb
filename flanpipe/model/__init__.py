"""The model: Megatron-Core GPTModel construction and the scorer evaluation uses (gpt), Megatron version shims
(megatron_compat), checkpoint I/O under any TP x PP (checkpointing), and HuggingFace checkpoints in and out
(hf_format, hf_import, hf_export).

Layer 2: may import ``core`` and ``data`` (a checkpoint's tokenizer). hf_format is torch-free at import,
because the plan reads an HF ``config.json`` with it; the other modules import torch.
"""
