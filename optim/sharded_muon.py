"""Muon for FSDP2-sharded (DTensor) matrices: Newton-Schulz on the whole matrix, once per step.

torch.optim.Muon runs on a DTensor shard too, but then every matmul of its Newton-Schulz loop
is a distributed bf16 matmul (15 redistributions per matrix per step, results off by bf16
rounding from the unsharded run). Here each rank gathers the matrix's momentum update once,
orthogonalises it with torch's own Newton-Schulz, and applies its own rows; the momentum buffer
stays sharded. The arithmetic is that of torch's ``_single_tensor_muon``, so a sharded run
matches a DDP run to float tolerance.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Muon
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


class ShardedMuon(Muon):
    """torch.optim.Muon whose step orthogonalises gathered whole matrices (same state layout:
    ``momentum_buffer`` per parameter, here a DTensor shaped like the parameter)."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                ortho = _zeropower_via_newtonschulz(
                    whole, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                if isinstance(param, DTensor):  # keep this rank's rows (no communication)
                    ortho = distribute_tensor(
                        ortho, param.device_mesh, param.placements, src_data_rank=None
                    )
                adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], param.shape)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(ortho, alpha=-adjusted_lr)
        return loss
