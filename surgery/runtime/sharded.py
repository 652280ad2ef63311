"""Models held by FSDP2 (`torch.distributed.fsdp.fully_shard`): the full state dict gathered with
the distributed state-dict API, and a plain copy of the module tree — the user's own classes, no
sharding, no FSDP hooks — to load a folded state dict into (FSDP modules cannot be deep-copied)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether any module of `model` was wrapped by `fully_shard`."""
    cls = _fsdp_module_class()
    return cls is not None and any(isinstance(m, cls) for m in model.modules())


def full_state_dict(model: nn.Module, *, rank0_only: bool) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU, gathered shard by shard (every rank must call this). With
    rank0_only the other ranks get an empty dict and rank 0 holds the only full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not rank0_only and dist.is_initialized() and dist.get_world_size() > 1:
        box = [state if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def plain_copy(model: nn.Module, _memo: dict[int, nn.Parameter] | None = None) -> nn.Module:
    """The module tree of `model` in its original classes, without FSDP state or hooks, its
    parameters and buffers on the meta device (fill it with `load_full`); tied parameters stay tied."""
    memo = {} if _memo is None else _memo
    fsdp = _fsdp_module_class()
    cls = type(model)
    if fsdp is not None and isinstance(model, fsdp):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, fsdp))
    copy = cls.__new__(cls)
    state = {
        key: value
        for key, value in model.__dict__.items()
        if not key.startswith(("__composable_api_state_key", "_fsdp", "_is_fsdp"))
    }
    for key, value in list(state.items()):
        if key.endswith("hooks") and isinstance(value, OrderedDict):
            state[key] = OrderedDict((k, h) for k, h in value.items() if not _is_fsdp_hook(h))
    state["_parameters"] = {
        name: None if p is None else _meta_parameter(p, memo)
        for name, p in model._parameters.items()
    }
    state["_buffers"] = {
        name: None if b is None else _meta(b) for name, b in model._buffers.items()
    }
    state["_modules"] = {
        name: None if m is None else plain_copy(m, memo) for name, m in model._modules.items()
    }
    for key in (
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        kept = state["_forward_pre_hooks" if "pre" in key else "_forward_hooks"]
        state[key] = OrderedDict((k, v) for k, v in state[key].items() if k in kept)
    copy.__dict__.update(state)
    return copy


def _meta_parameter(p: nn.Parameter, memo: dict[int, nn.Parameter]) -> nn.Parameter:
    if id(p) not in memo:
        memo[id(p)] = nn.Parameter(_meta(p), requires_grad=p.requires_grad)
    return memo[id(p)]


def load_full(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Fill a `plain_copy` with a full state dict without copying it (assign), then re-tie the
    parameters the copy shares (assign gives each name its own tensor)."""
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                shared.setdefault(id(p), []).append((module, name))
    model.load_state_dict(state, strict=True, assign=True)
    for places in shared.values():
        first = places[0][0]._parameters[places[0][1]]
        for module, name in places[1:]:
            module._parameters[name] = first
    return model


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")  # a DTensor's shape is the global one


def _is_fsdp_hook(hook: object) -> bool:
    owner = getattr(hook, "__self__", hook)
    return type(owner).__module__.startswith("torch.distributed.fsdp")


def gathered(model: nn.Module) -> nn.Module:
    """`model` itself when it is not sharded; else a plain copy holding the full state on every
    rank (every rank must call this)."""
    if not is_sharded(model):
        return model
    return load_full(plain_copy(model), full_state_dict(model, rank0_only=False))


def row_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor split by rows (dim 0) over a one-dimensional mesh, as FSDP2 holds
    every parameter."""
    from torch.distributed.tensor import Shard

    placements = getattr(t, "placements", None)
    return placements is not None and list(placements) == [Shard(0)]


class Gathering(Mapping[str, torch.Tensor]):
    """A sharded model's tensors, each gathered in full when read (a collective: every rank must
    read the same names in the same order), except the `local` ones: this rank's shard, with no
    traffic. `received` counts the bytes that came from other ranks."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], local: set[str] | None = None):
        self.tensors, self.local, self.received = tensors, local or set(), 0

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        if name in self.local:
            return t.to_local().detach()
        if not hasattr(t, "full_tensor"):
            return t.detach()
        full = t.full_tensor()
        self.received += (full.numel() - t.to_local().numel()) * full.element_size()
        return full.detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def write_back(target: torch.Tensor, value: torch.Tensor) -> None:
    """Store the full tensor `value` into `target` in place: a DTensor keeps only its own shard
    (cut locally, as every rank holds the same `value`), a plain tensor all of it."""
    value = value.to(target.dtype)
    if hasattr(target, "to_local"):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(value)
