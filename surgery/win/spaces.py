"""Channel spaces: which tensors share one channel indexing (a residual add joins its inputs' channels,
a BatchNorm or ReLU keeps its input's). Widening a network, or sampling a thin layer's neurons from a
wide one, must treat each space as one unit."""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.blocks import feature_axes
from surgery.errors import PlanError
from surgery.graph import Dataflow, Layout
from surgery.rewrites import channel_ops

# ops whose output channels are their input's channels (same space, same interleaving)
_SAME_SPACE = ("batch_norm", "norm", "nonlinear", "max_pool")
# ops that write channels of their own
_NEW_SPACE = ("linear", "conv", "embedding")


@dataclass
class Spaces:
    """Each op's output feature axis as (space, inner) with feature index = channel * inner + j."""

    space: dict[str, str] = field(default_factory=dict)  # op -> space id (before union)
    inner: dict[str, int] = field(default_factory=dict)
    width: dict[str, int] = field(default_factory=dict)  # space id -> number of channels
    fixed: set[str] = field(
        default_factory=set
    )  # spaces that keep their width (model input/outputs)
    opaque: dict[str, str] = field(default_factory=dict)  # op -> why its channels are unknown
    _parent: dict[str, str] = field(default_factory=dict)

    def root(self, space: str) -> str:
        while self._parent.get(space, space) != space:
            space = self._parent[space]
        return space

    def union(self, a: str, b: str) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self._parent[rb] = ra
            if self.width.get(ra) != self.width.get(rb):
                raise PlanError(
                    f"channel spaces {a} ({self.width.get(ra)}) and {b} ({self.width.get(rb)}) are joined but differ in width"
                )

    def of(self, op_name: str) -> str:
        return self.root(self.space[op_name])

    def is_fixed(self, op_name: str) -> bool:
        root = self.of(op_name)
        return any(self.root(f) == root for f in self.fixed)


def channel_spaces(flow: Dataflow) -> Spaces:
    """The channel spaces of a captured CNN/MLP-style model."""
    users = flow.users()
    axes = feature_axes(flow, users)
    s = Spaces()
    for op in flow.ops.values():
        width = (op.shape or (1,))[axes[op.name]] if op.shape else 0
        if op.kind == "input" or not op.inputs or op.kind in _NEW_SPACE:
            s.space[op.name], s.inner[op.name], s.width[op.name] = op.name, 1, width
            if op.kind == "input":
                s.fixed.add(op.name)
            if op.kind == "conv" and op.attrs.get("groups", 1) > 1:
                src = op.inputs[0]
                if (
                    op.attrs["groups"] == width == s.width[s.of(src)]
                ):  # depthwise: channel c reads channel c
                    s.union(s.of(src), op.name)
                else:
                    s.opaque[op.name] = f"grouped conv {op.module} (groups={op.attrs['groups']})"
            continue
        src = flow.ops[op.inputs[0]]
        s.space[op.name] = s.space[src.name]
        s.inner[op.name] = s.inner[src.name]
        if op.kind in _SAME_SPACE:
            pass
        elif op.kind == "transparent":
            layout = Layout(axes[src.name], s.width[s.of(src.name)], 1, s.inner[src.name])
            moved = channel_ops.propagate(op, layout, src.shape or ())
            if isinstance(moved, str) or moved.outer != 1:
                s.opaque[op.name] = (
                    f"{op.op} ({op.name}) moves channels in a way widening cannot follow"
                )
            else:
                s.inner[op.name] = moved.inner
        elif op.kind in ("add", "mul"):
            for other in op.inputs[1:]:
                if (
                    other in s.space
                    and s.inner[other] == s.inner[src.name]
                    and flow.ops[other].kind != "other"
                ):
                    s.union(s.of(src.name), s.of(other))
        elif op.kind == "attention":
            s.space[op.name], s.inner[op.name], s.width[op.name] = op.name, 1, width
            s.union(s.of(src.name), op.name)  # embed_dim is both the input and the output width
        else:
            s.opaque[op.name] = f"{op.op} ({op.name}): no rule for its channels"
            s.space[op.name], s.inner[op.name], s.width[op.name] = op.name, 1, width
    for out in flow.outputs:
        s.fixed.add(s.of(out))
    return s
