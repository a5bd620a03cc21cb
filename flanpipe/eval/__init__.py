"""Evaluation: zero-/few-shot scoring of eval shards (evaluate), the model at TP x PP x DP with KV-cache
decoding (inference), the paper's metrics (metrics) and the evaluation layout (layout, torch-free).

Layer 4: may import ``core``, ``data``, ``model`` and ``train`` (process-group setup).
"""
