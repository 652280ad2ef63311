"""analyse, part 1: block boundaries of a captured model.

A boundary is a tensor through which all activation flow from the input to the outputs passes: a
dominator of the outputs in the networkx dataflow graph rooted at the activation input (side inputs
such as masks are not activations and do not count). A boundary followed only by ops that commute
with a channel mix (pooling, flatten, dropout, ...) is one boundary, named after where it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from surgery.analysis.routes import find_route
from surgery.analysis.spaces import feature_axes
from surgery.ir.graph import Dataflow, Layout, Op
from surgery.plan import Placement, Route
from surgery.report import render_table
from surgery.rewrites import channel_ops
from surgery.rewrites.common import RuleContext

_SINK = "__outputs__"


@dataclass
class Boundary:
    """One block boundary: where it is, how wide, and how a pair there folds (or why it cannot)."""

    name: str
    tensor: str
    feeds: str  # the blocks that read it
    shape: tuple[int, ...]
    feature_axis: int
    width: int
    route: Route | None
    reason: str | None
    probe: Placement | None
    aliases: list[str] = field(default_factory=list)
    inside_block: bool = False  # a cut between the layers of an innermost block (hidden by default)
    in_block: bool = False  # not a cut: a site inside a block whose output cannot take a pair
    checked: str = (
        ""  # the numeric self-check's verdict (surgery.analysis.selfcheck); "" when not run
    )

    @property
    def foldable(self) -> bool:
        return self.route is not None


NOT_CHECKED = "not numerically checked"


class BlockTable(list):
    """The boundaries of a model, in forward order; prints as a table."""

    def __init__(self, boundaries: list[Boundary], flow: Dataflow, bias: bool) -> None:
        super().__init__(boundaries)
        self.flow = flow
        self.bias = bias

    def hidden_notes(self) -> list[str]:
        """What other outputs hide: the boundaries on one output's way that another output
        branching off before them takes out of the table, and which output does."""
        notes = []
        for out, others in hidden_by_outputs(self.flow).items():
            hidden = [
                c for c in cut_tensors(self.flow, out) if c not in set(cut_tensors(self.flow))
            ]
            notes.append(
                f"{len(hidden)} tensors all of the flow to output {_describe(self.flow, out)} "
                f"passes are hidden by the output {', '.join(_describe(self.flow, o) for o in others)}, "
                "which branches off before them: return it from after them, or drop it, to get "
                "their boundaries"
            )
        return notes

    @property
    def names(self) -> list[str]:
        return [b.name for b in self]

    @property
    def foldable(self) -> list[Boundary]:
        return [b for b in self if b.foldable]

    @property
    def why_no_sites(self) -> str:
        """Why no pair can go anywhere: no boundary at all, or the first boundaries' reasons."""
        if not self:
            inputs = len(self.flow.example_shapes)
            return (
                f"no tensor carries all the activation flow from the {inputs} input(s) to the "
                "outputs, so the model has no block boundary (an encoder-decoder, or inputs that "
                "reach the outputs by separate paths, e.g. through cross-attention): this surgery "
                "has no site to offer for it yet"
            ) + "".join(f"; {note}" for note in self.hidden_notes())
        refused = [b for b in self if not b.foldable][:5]
        return "; ".join(f"{b.name}: {b.reason or 'no rule applies'}" for b in refused) or (
            "the boundaries that fold are all inside blocks: name them in sites="
        )

    def get(self, name: str) -> Boundary:
        """A boundary by its name or any alias (e.g. 'layer1.2' for 'layer1', 'avgpool' for 'layer4')."""
        for boundary in self:
            if name == boundary.name or name in boundary.aliases:
                return boundary
        raise KeyError(name)

    def rows(self) -> list[list[Any]]:
        rows = []
        for i, b in enumerate(self):
            if b.route is not None:
                detail = ", ".join(b.route.absorbed_by)
                if b.route.kept:
                    detail += f"; h kept on: {', '.join(b.route.kept)}"
                if b.route.notes:
                    detail += f"; {'; '.join(b.route.notes)}"
                fold = f"{b.route.kind}, in block" if b.in_block else b.route.kind
            else:
                detail, fold = b.reason or "", "refused"
                if b.probe is not None:
                    fold += " (probe only)"
            rows.append(
                [
                    i,
                    b.name,
                    b.feeds,
                    "x".join(map(str, b.shape)),
                    b.feature_axis,
                    b.width,
                    fold,
                    b.checked or (NOT_CHECKED if b.foldable else "-"),
                    detail,
                ]
            )
        return rows

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.flow.example_shapes)
        return render_table(
            f"Block boundaries of {self.flow.model_class.rsplit('.', 1)[-1]} (input {shapes}, {self.flow.method})",
            [
                "#",
                "site",
                "feeds",
                "shape",
                "axis",
                "width",
                "fold",
                "numeric check",
                "absorbed by / why not",
            ],
            self.rows(),
            caption=f"{len(self.foldable)} of {len(self)} boundaries fold exactly"
            + (" with a pair bias" if self.bias else "")
            + ("" if self else f": {self.why_no_sites}")
            + ("".join(f"; {note}" for note in self.hidden_notes()) if self else ""),
        )

    def __repr__(self) -> str:
        return str(self)


def analyse(flow: Dataflow, *, bias: bool = False, inside_blocks: bool = False) -> BlockTable:
    """Boundaries of a captured model (see find_blocks)."""
    ctx = RuleContext(flow, bias)
    axes = feature_axes(flow)
    groups = [
        g for g in _boundary_groups(flow, axes) if _ends_a_block_or_is_top_level(flow, g, ctx.users)
    ]
    inside = _inside_innermost_blocks(flow, groups, ctx.users)
    if not inside_blocks:
        groups = [g for g in groups if g[0] not in inside]
    boundaries = [_boundary(flow, group, axes, ctx, inside=group[0] in inside) for group in groups]
    boundaries += _sublayer_sites(flow, boundaries, axes, ctx)
    order = {name: i for i, name in enumerate(flow.ops)}
    boundaries.sort(key=lambda b: order[b.tensor])
    return BlockTable(_unique_names(boundaries), flow, bias)


def _boundary(
    flow: Dataflow,
    group: list[str],
    axes: dict[str, int],
    ctx: RuleContext,
    *,
    inside: bool = False,
    in_block: bool = False,
) -> Boundary:
    head = flow.ops[group[0]]
    layout = Layout(axes[head.name], (head.shape or ())[axes[head.name]])
    route, reason = find_route(head, layout, ctx)
    name, aliases = _names(flow, group, ctx.users)
    return Boundary(
        name=name,
        tensor=head.name,
        feeds=_next_blocks(flow, group, ctx.users),
        shape=tuple(head.shape or ()),
        feature_axis=layout.axis,
        width=layout.d,
        route=route,
        reason=reason,
        probe=_probe(flow, head, layout, route, ctx.users),
        aliases=aliases,
        inside_block=inside,
        in_block=in_block,
    )


def _sublayer_sites(
    flow: Dataflow, boundaries: list[Boundary], axes: dict[str, int], ctx: RuleContext
) -> list[Boundary]:
    """Where a block's output cannot take a pair (a pre-LN residual stream feeds only a norm and an
    add), the sites inside the block that can: each norm output (read by q/k/v or the MLP's input
    projections) and each Linear output written into the residual add (attention output and MLP
    down projections, folded on the producer side). A block is the module the boundary ends, or
    the ops since the previous boundary when they all sit in one container (blocks written as an
    nn.ModuleDict or nn.ModuleList of layers, called from the parent's forward)."""
    taken = {b.tensor for b in boundaries}
    order = {name: i for i, name in enumerate(flow.ops)}
    names = list(flow.ops)
    inside: set[str] = set()
    previous = -1
    for b in sorted(boundaries, key=lambda b: order[b.tensor]):
        segment = names[previous + 1 : order[b.tensor] + 1]
        previous = order[b.tensor]
        if b.foldable:
            continue
        if flow.module_kinds.get(b.name) == "block":
            inside.update(o.name for o in flow.ops.values() if b.name in o.scope)
        elif _one_container(flow, segment):
            inside.update(segment)
    graph = dataflow_graph(flow) if inside else nx.DiGraph()
    found = []
    for name in names:
        op = flow.ops[name]
        if name in taken or name not in inside or not op.shape:
            continue
        if op.kind == "norm" or (op.kind == "linear" and _writes_residual(op.name, ctx, graph)):
            site = _boundary(flow, [op.name], axes, ctx, in_block=True)
            if site.foldable:
                found.append(site)
    return found


def _one_container(flow: Dataflow, segment: list[str]) -> bool:
    """Whether the module calls among `segment` all sit in one container module (ModuleDict,
    ModuleList, Sequential) other than the root: the layers of one block held in a container."""
    paths = [flow.ops[n].module for n in segment if flow.ops[n].module]
    if not paths:
        return False
    containers = [p for p in flow.module_kinds if flow.module_kinds[p] == "container"]
    return any(all(q.startswith(c + ".") for q in paths) for c in containers)


def _writes_residual(
    name: str, ctx: RuleContext, graph: nx.DiGraph, source: str | None = None
) -> bool:
    """Whether a tensor reaches, through pointwise ops only (dropout, identity, scaling), an add whose
    other operand does not depend on it: a skip connection, not e.g. the x + 0.044715 x³ of a GELU."""
    source = source or name
    for user in (ctx.flow.ops[u] for u in ctx.users[name]):
        if user.kind == "add":
            others = [i for i in user.inputs if i != name]
            if others and not any(nx.has_path(graph, source, o) for o in others):
                return True
        elif user.kind == "transparent" and user.attrs.get("family") == "pointwise":
            if _writes_residual(user.name, ctx, graph, source):
                return True
    return False


def dataflow_graph(flow: Dataflow) -> nx.DiGraph:
    """The activation dataflow: ops reachable from the activation input, plus a sink after the outputs."""
    graph = nx.DiGraph()
    for op in flow.ops.values():
        graph.add_node(op.name)
        for src in op.inputs:
            graph.add_edge(src, op.name)
    for out in flow.outputs:
        graph.add_edge(out, _SINK)
    source = flow.inputs[0]
    return graph.subgraph(nx.descendants(graph, source) | {source}).copy()


def cut_tensors(flow: Dataflow, to: str = _SINK) -> list[str]:
    """Single-tensor cuts between the activation input and the outputs (or the one output `to`),
    in forward order."""
    if not flow.inputs:
        return []
    graph = dataflow_graph(flow)
    if to not in graph:
        return []
    idom = nx.immediate_dominators(graph, flow.inputs[0])
    chain = []
    node = idom[to]
    while node != flow.inputs[0]:
        chain.append(node)
        node = idom[node]
    return [n for n in reversed(chain) if n not in flow.outputs]


def _describe(flow: Dataflow, name: str) -> str:
    op = flow.ops[name]
    shape = "x".join(map(str, op.shape or ()))
    return f"{op.module or name} ({shape})"


def hidden_by_outputs(flow: Dataflow) -> dict[str, list[str]]:
    """Output -> the other outputs that hide the cuts on its own way from the input: tensors all
    of its flow passes but another output's flow branches off before (e.g. a model that also
    returns its embeddings hides every block boundary of the logits)."""
    if len(flow.outputs) < 2:
        return {}
    graph = dataflow_graph(flow)
    common = set(cut_tensors(flow))
    found = {}
    for out in flow.outputs:
        own = [c for c in cut_tensors(flow, out) if c not in common]
        if own:
            found[out] = [
                o
                for o in flow.outputs
                if o != out and not any(nx.has_path(graph, c, o) for c in own[:1])
            ]
    return {o: others for o, others in found.items() if others}


def _boundary_groups(flow: Dataflow, axes: dict[str, int]) -> list[list[str]]:
    """Cut tensors, with each cut merged into the previous one when a commuting op is all between them."""
    groups: list[list[str]] = []
    for name in cut_tensors(flow):
        op = flow.ops[name]
        if not op.shape or op.dtype is None or not op.dtype.is_floating_point:
            continue
        if groups and op.kind == "transparent" and op.inputs == [groups[-1][-1]]:
            src = flow.ops[groups[-1][-1]]
            if isinstance(
                channel_ops.propagate(
                    op, Layout(axes[src.name], src.shape[axes[src.name]]), src.shape
                ),
                Layout,
            ):
                groups[-1].append(name)
                continue
        groups.append([name])
    return groups


def _ends_a_block_or_is_top_level(
    flow: Dataflow, group: list[str], users: dict[str, list[str]]
) -> bool:
    """A cut in the middle of a module's forward (e.g. before its last activation) is not a boundary,
    unless it is a sum of embedding lookups (token + position), which the producer rule can fold."""
    head = flow.ops[group[0]]
    if head.kind == "add" and all(flow.ops[i].kind in ("embedding", "add") for i in head.inputs):
        return True
    return not head.scope or any(
        flow.module_calls.get(s, 1) == 1 for s in _ended_scopes(flow, group, users)
    )


def _inside_innermost_blocks(
    flow: Dataflow, groups: list[list[str]], users: dict[str, list[str]]
) -> set[str]:
    """Cuts strictly inside an innermost block: a custom module (not a container, not a leaf) whose
    output is a cut and that holds no other such module (a MobileNet InvertedResidual, a BertAttention)."""
    ended = {g[0]: set(_ended_scopes(flow, g, users)) for g in groups}
    blocks = {s for scopes in ended.values() for s in scopes if flow.module_kinds.get(s) == "block"}
    innermost = {b for b in blocks if not any(o != b and o.startswith(b + ".") for o in blocks)}
    return {
        h for h in ended if any(b in flow.ops[h].scope and b not in ended[h] for b in innermost)
    }


def _escapes(flow: Dataflow, group: list[str], users: dict[str, list[str]]) -> list[Op]:
    members = set(group)
    return [flow.ops[u] for m in group for u in users[m] if u not in members]


def _ended_scopes(flow: Dataflow, group: list[str], users: dict[str, list[str]]) -> list[str]:
    """Module scopes that h leaves (h is their result), outermost first."""
    head = flow.ops[group[0]]
    outside = _escapes(flow, group, users)
    is_output = any(m in flow.outputs for m in group)
    return [s for s in head.scope if is_output or any(s not in u.scope for u in outside)]


def _names(flow: Dataflow, group: list[str], users: dict[str, list[str]]) -> tuple[str, list[str]]:
    ended = [s for s in _ended_scopes(flow, group, users) if flow.module_calls.get(s, 1) == 1]
    aliases = ended[1:] + [m for m in group if m not in ended]
    if ended:
        return ended[0], aliases
    head = flow.ops[group[0]]
    inner = head.scope[-1] if head.scope else ""
    name = f"{inner}:{head.name}" if inner else head.name
    return name, [a for a in [head.name, *group[1:]] if a != name]


def _next_blocks(flow: Dataflow, group: list[str], users: dict[str, list[str]]) -> str:
    tail = flow.ops[group[-1]]
    found = []
    for user in _escapes(flow, group, users):
        entered = [s for s in user.scope if s not in tail.scope]
        found.append(entered[0] if entered else user.module or user.name)
    if any(m in flow.outputs for m in group):
        found.append("output")
    return ", ".join(dict.fromkeys(found)) or "-"


def _unique_names(boundaries: list[Boundary]) -> list[Boundary]:
    seen: set[str] = set()
    for b in boundaries:
        if b.name in seen:
            b.aliases.append(b.name)
            b.name = f"{b.name}:{b.tensor}"
        seen.add(b.name)
    return boundaries


def _probe(
    flow: Dataflow, head: Op, layout: Layout, route: Route | None, users: dict[str, list[str]]
) -> Placement | None:
    """Where the paired model can read h to compute the WIN probe M1(h), or None."""
    if route is not None and route.kind != "consumer" and len(route.placements) == 1:
        return route.placements[0]
    if route is not None and route.kind == "consumer":
        for p in route.placements:
            module_input = next(
                (
                    u
                    for u in users[head.name]
                    if flow.ops[u].module == p.module and p.where == "input"
                ),
                None,
            )
            if module_input and (p.outer, p.inner, p.axis) == (1, 1, layout.axis):
                return p
    group = [head.name]
    for scope in _ended_scopes(flow, group, users):
        if flow.module_calls.get(scope, 1) != 1 or not flow.returns_tensor.get(scope, True):
            continue  # a hook there would read a tuple or a ModelOutput, not h
        inside = [o for o in flow.ops.values() if scope in o.scope]
        escaping = {
            o.name
            for o in inside
            if o.name in flow.outputs or any(scope not in flow.ops[u].scope for u in users[o.name])
        }
        if escaping == {head.name}:
            return Placement(scope, "output", layout.axis)
    if (
        head.module
        and flow.module_calls.get(head.module, 1) == 1
        and flow.returns_tensor.get(head.module, True)
    ):
        return Placement(head.module, "output", layout.axis)
    for u in users[head.name]:
        user = flow.ops[u]
        if (
            user.module
            and flow.module_calls.get(user.module, 1) == 1
            and user.inputs[:1] == [head.name]
        ):
            return Placement(user.module, "input", layout.axis)
    return None
