"""What every fold rule checks first: the weights it would change belong to one call of one module."""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.ir.graph import CHANNELS_FIRST, Dataflow, Op


@dataclass
class RuleContext:
    """The captured model as the rules see it, and the pair being planned."""

    flow: Dataflow
    bias: bool  # the pair has a bias c that must be absorbed too
    users: dict[str, list[str]] = field(init=False)
    readers: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.users = self.flow.users()
        self.readers = self.flow.param_readers()


def where(op: Op) -> str:
    """How people name an op: its module path, or the op and its node name (and the module whose
    forward it is in)."""
    if op.module:
        return op.module
    inside = f" in {op.scope[-1]}" if op.scope else ""
    return f"{op.op} ({op.name}{inside})"


def unshared_reason(op: Op, ctx: RuleContext) -> str | None:
    """Why `op`'s parameters cannot be changed for this call only, or None when they can."""
    if op.module is None:
        return f"{op.op} at {op.name} is a function call: the pair needs a module to attach to (use the nn module)"
    for name in op.params.values():
        tied = ctx.flow.param_aliases.get(name)
        if tied:
            return (
                f"parameter {name} is tied to {', '.join(tied)}: a fold here would change every user of the "
                "tied tensor; untie them first"
            )
    calls = ctx.flow.module_calls.get(op.module, 1)
    if calls > 1:
        return (
            f"module {op.module} is called {calls} times in one forward (shared weights): folding for one "
            "call would change the others; give each call its own module"
        )
    for name in op.params.values():
        if len(ctx.readers.get(name, [])) > 1:
            return f"parameter {name} is read by {len(ctx.readers[name])} ops (shared weights)"
    return None


def feature_axis(op: Op) -> int:
    """The axis an op writes features to: 1 for convs and BatchNorm (N, C, ...), else the last."""
    rank = len(op.shape or ())
    return 1 if op.kind in CHANNELS_FIRST and rank >= 2 else rank - 1
