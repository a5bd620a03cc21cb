"""Training: the spine (loop: model_provider / forward_step / loss_func, resume, logging), the packed-row
reader (rows), optimizers (optim: Adafactor, Adam), the launcher (torchrun / srun) and the TP x PP x DP
layout planner (planner, torch-free).

Layer 3: may import ``core``, ``data`` and ``model``.
"""
