"""Model utilities every stage uses: the module inside a training wrapper, and a paired model's plan.

Kept apart from the fold and the pairs so that neither has to import the other to find them."""

from __future__ import annotations

from torch import nn

from surgery.errors import FoldError
from surgery.plan import Plan


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def plan_of(paired: nn.Module) -> Plan:
    """The Plan a paired model carries (FoldError naming the model when it has none)."""
    plan = getattr(unwrap(paired), "plan", None)
    if not isinstance(plan, Plan):
        raise FoldError(
            f"{type(paired).__name__} is not a paired model (it has no surgery plan): pass the result of surgery.insert_pairs"
        )
    return plan
