"""FSDP (torch's FSDP2, ``fully_shard``) for training whose fp32 masters, gradients and AdamW state (16 bytes
per trainable weight) do not fit one GPU: full fine-tuning of a model whose fp32 copy still loads on one
GPU (each process loads a whole copy before sharding it). The recipes need none — a 4-bit 70B teacher and
the 9B LoRA student each fit one 80 GB GPU, where DDP is simpler and faster — and LoRA gains little from it:
its trainable part is small.

Contract:
- ``shard(model)`` shards every decoder layer, then the rest, over all processes (dim 0 of each
  parameter; parameter names are unchanged). Trainable tensors are fp32 masters (``modeling``); forwards run
  under the loop's autocast, so FSDP itself casts nothing.
- Every function here that touches sharded parameters is a collective: all processes call it, in the same
  order (``full_trainable``, ``load_full_trainable``). Whole tensors are gathered one at a time and kept only
  where asked: rank 0, to save them, holds every whole trainable tensor on the host while it writes (4 bytes a
  weight under full fine-tuning: a 9B needs ~37 GB of host RAM there), the other processes one tensor at a
  time; they are read back one tensor at a time from a safetensors file.
- Memory under autocast: each layer's weights are whole only while it runs, but autocast keeps a 16-bit
  copy of every fp32 master it casts for the forward and saves it for backward, and the root unit
  (embeddings, final norm, head) stays whole through a step — ``recipe.training_memory`` counts both.
- Gradients are reduce-scattered after every micro-batch: FSDP2 would otherwise keep whole, unsharded
  gradients between the micro-batches of a step (4 bytes per weight: what sharding is there to avoid).
- Checkpoints hold each process's own shards (``local_trainable``, ``local_optimizer``) as safetensors — no
  torch.distributed.checkpoint (its metadata is pickled) — so a run resumes on the same process count.
- Without sharded parameters every function is the plain single-copy operation, so the DDP path and the
  single process share this code.

It is engaged by ``TrainConfig.fsdp`` under a MULTI_GPU ``accelerate launch`` (torchrun), never by
accelerate's FSDP plugin (which cannot start on a CPU, so CI could not test it).
"""

from __future__ import annotations

from typing import Any


def decoder_layers(model: Any) -> list[Any]:
    """The transformer blocks of a HF decoder (classes named ``…DecoderLayer``), in order."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard(model: Any) -> Any:
    """FSDP2 over the default process group: each decoder layer is one unit (its parameters all-gathered
    just before it runs, freed after), the embeddings, final norm and head the root unit."""
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        import torch

        raise RuntimeError(f"train.fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from None
    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ValueError("train.fsdp shards over several processes: launch with accelerate (a MULTI_GPU config, "
                         "e.g. configs/accelerate/8xA100-fsdp.yaml) — one process has nothing to shard over")

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: Any) -> bool:
    """Whether ``model`` was sharded by ``shard`` (FSDP2 turns its class into an ``FSDPModule``; a torch
    without FSDP2 has never sharded anything)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def trainable(model: Any) -> dict[str, Any]:
    """Name → parameter of every trainable tensor. A sharded model is resharded first: FSDP2 leaves the root
    unit's parameters whole (plain tensors on a buffer it frees later) after a forward."""
    if is_sharded(model):
        for module in model.modules():
            if is_sharded(module):
                module.reshard()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def full_trainable(model: Any, keep: bool = True) -> dict[str, Any]:
    """Name → the whole trainable tensor, detached on the CPU. When sharded, a collective: each tensor is
    gathered in turn on every process and kept only where ``keep`` (the others get an empty dict)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in trainable(model).items():
        value = p.detach()
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[name] = whole.to("cpu", copy=True).contiguous()
        del whole
    return out


def load_full_trainable(model: Any, path: Any) -> None:
    """Copy the whole trainable tensors saved in the safetensors file ``path`` into ``model``, one tensor at a
    time (each process keeps its own shard of each)."""
    import torch
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = trainable(model)
    with safe_open(str(path), framework="pt") as f:
        missing = sorted(set(params) ^ set(f.keys()))
        if missing:
            raise ValueError(f"{path} does not match the model's trainable tensors: {missing[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                value = f.get_tensor(name)
                if isinstance(p, DTensor):
                    local = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements).to_local()
                    p.to_local().copy_(local)
                else:
                    p.copy_(value.to(p.device))
                del value


def local_trainable(model: Any) -> dict[str, Any]:
    """This process's part of every trainable tensor (the whole tensor when not sharded), on the CPU."""
    from torch.distributed.tensor import DTensor

    return {name: (p.detach().to_local() if isinstance(p, DTensor) else p.detach()).to("cpu", copy=True).contiguous()
            for name, p in trainable(model).items()}


def load_local_trainable(model: Any, weights: dict[str, Any]) -> None:
    """Undo ``local_trainable`` (same process count)."""
    import torch
    from torch.distributed.tensor import DTensor

    params = trainable(model)
    missing = sorted(set(params) ^ set(weights))
    if missing:
        raise ValueError(f"the checkpoint does not match the model: {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            target = p.to_local() if isinstance(p, DTensor) else p
            if target.shape != weights[name].shape:
                raise ValueError(f"{name}: checkpoint shard {tuple(weights[name].shape)} vs this process's "
                                 f"{tuple(target.shape)} — resume on the process count that wrote it")
            target.copy_(weights[name].to(target.device))


def local_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state_dict with each DTensor replaced by this process's shard."""
    from torch.distributed.tensor import DTensor

    slots = {idx: {k: (v.to_local().to("cpu", copy=True) if isinstance(v, DTensor) else v) for k, v in entry.items()}
             for idx, entry in state["state"].items()}
    return {"state": slots, "param_groups": state["param_groups"]}


def sharded_optimizer(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Undo ``local_optimizer`` for ``optimizer``: each shard that belongs to a sharded parameter (same
    shape) becomes a DTensor laid out like it."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        if isinstance(p, DTensor):
            local = p.to_local()
            entry = {k: (DTensor.from_local(v.to(local.device), p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride())
                         if hasattr(v, "shape") and v.shape == local.shape else v) for k, v in entry.items()}
        out[idx] = entry
    return {"state": out, "param_groups": state["param_groups"]}
