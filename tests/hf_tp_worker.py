"""One rank of a TP x PP forward over an imported model (run by tests/test_hf.py with env:// variables).

argv: model_dir, tp, pp, tokens.pt, out.pt. Rank 0 writes the full logits [b, s, V] (gathered over TP,
broadcast from the last pipeline stage) of flanpipe's own parallel scorer, ``load_parallel_lm``.
"""

import sys

import torch
import torch.distributed as dist

from flanpipe.eval.inference import load_parallel_lm
from flanpipe.model import megatron_compat

if __name__ == "__main__":  # dist_checkpointing re-imports __main__
    model_dir, tp, pp, tokens_path, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
    megatron_compat.apply()
    lm = load_parallel_lm(model_dir, tp=tp, pp=pp)
    logits = lm.logits(torch.load(tokens_path))
    if dist.get_rank() == 0:
        torch.save(logits, out_path)
    dist.barrier()
