"""One rank of a TP x PP=1 forward over an imported model (run by tests/test_hf.py with env:// variables).

argv: model_dir, tp, tokens.pt, out.pt. Rank 0 writes the full logits [b, s, V] gathered over TP.
"""

import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from flanpipe import megatron_compat
from flanpipe.checkpointing import load_weights
from flanpipe.model import model_provider
from flanpipe.model_config import load_model_config

if __name__ == "__main__":  # dist_checkpointing re-imports __main__
    model_dir, tp, tokens_path, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    megatron_compat.quiet_warnings()
    megatron_compat.apply()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tp, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = load_model_config(os.path.join(model_dir, "model.json"))
    model = model_provider(cfg, tp=tp).eval()
    load_weights(model, os.path.join(model_dir, "checkpoint"))
    tokens = torch.load(tokens_path)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        local = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if dist.get_rank() == 0:
        torch.save(torch.cat(parts, dim=-1), out_path)
    dist.barrier()
