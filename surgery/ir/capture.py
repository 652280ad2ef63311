"""capture: nn.Module + example inputs -> `Dataflow` (canonical ops with shapes and parameter names).

`torch.fx.symbolic_trace` first (keeps module calls, cheap); if it cannot trace the model,
`torch.export.export(strict=False)`. Shapes come from running the traced graph on the example inputs
(fx) or from export's fake-tensor metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from surgery.errors import CaptureError, PlanError
from surgery.ir import normalize
from surgery.ir.graph import Dataflow, Op, Ref, Traced

_TORCH_DIR = os.path.dirname(torch.__file__)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_DIRS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("surgery", "rewrites", "cli"))


def as_example_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example inputs to a tuple; synthesise one batch from the first layer when None."""
    if example_inputs is None:
        return synthesise_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise PlanError(
        f"example_inputs must be a tensor or a tuple of the model's positional inputs, got {type(example_inputs).__name__}"
    )


def synthesise_inputs(
    model: nn.Module, shape: Sequence[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """One random batch for `model`, shaped by its first layer (token ids for an embedding, floats
    otherwise); `shape` overrides the guessed shape (e.g. from the command line)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            guess = (2, module.in_channels, *[64] * len(module.kernel_size))
            return (torch.randn(*(shape or guess), device=device, dtype=dtype),)
        if isinstance(module, nn.Linear):
            return (torch.randn(*(shape or (2, module.in_features)), device=device, dtype=dtype),)
        if isinstance(module, nn.Embedding):
            return (
                torch.randint(0, module.num_embeddings, tuple(shape or (2, 16)), device=device),
            )
    if shape is not None:
        return (torch.randn(*shape, device=device, dtype=dtype),)
    raise PlanError(
        f"cannot guess an input for {type(model).__name__}: pass example_inputs, e.g. (torch.randn(2, 3, 64, 64),)"
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run shape propagation without touching BatchNorm running statistics; restore modes after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _user_frame(exc: BaseException) -> str | None:
    """'file:line: code' of the innermost frame outside torch and this package."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if (
            not path.startswith(_TORCH_DIR)
            and not path.startswith(_OWN_DIRS)
            and "<" not in frame.filename
        ):
            return (
                f"{os.path.basename(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()}"
            )
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class _PathTracer(fx.Tracer):
    """symbolic_trace that remembers the innermost module it was inside when tracing failed, and
    whether each module returned one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: tuple[str, str] | None = None
        self.returns: dict[str, bool] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Known layers are one op; torch.nn composites (TransformerEncoderLayer, ...) are traced
        through so their Linear/attention/norm calls become visible."""
        if normalize.is_leaf(m):
            return True
        has_children = next(m.children(), None) is not None
        return super().is_leaf_module(m, module_qualified_name) and not has_children

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m) or "<root>", type(m).__name__)
            raise
        path = self.path_of_module(m)
        one = isinstance(out, fx.Proxy) and normalize.classify_module(m)[0] != "attention"
        self.returns[path] = self.returns.get(path, True) and one
        return out


def forward_keywords(model: nn.Module) -> dict[str, Any]:
    """Keywords capture passes to a forward that takes them: `use_cache=False` (a model built with
    `from_pretrained` defaults returns a key/value cache object no tracer can follow; the cache is
    not part of what the model computes from its inputs)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def capture(model: nn.Module, example_inputs: Any = None) -> Dataflow:
    """Capture `model` on `example_inputs` into a Dataflow; raise CaptureError naming what failed."""
    inputs = as_example_inputs(model, example_inputs)
    tracer = _PathTracer()
    keywords = forward_keywords(model)
    try:
        graph = tracer.trace(model, concrete_args=keywords or None)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as fx_error:  # noqa: BLE001 - any trace failure means: try torch.export
        where = tracer.failed_in
        fx_reason = _first_line(fx_error)
        fx_where = f"module '{where[0]}' ({where[1]})" if where else "the top-level forward"
        frame = _user_frame(fx_error)
        fx_msg = f"torch.fx.symbolic_trace failed inside {fx_where}{f' at {frame}' if frame else ''}: {fx_reason}"
        return _capture_export(model, inputs, fx_msg, keywords)
    with torch.no_grad(), _eval_mode(model), contextlib.redirect_stderr(io.StringIO()):
        try:
            _ShapeAndSizeProp(gm).propagate(
                *inputs
            )  # it prints a traceback before re-raising: keep it quiet
        except Exception as error:  # noqa: BLE001
            raise _input_mismatch(model, inputs, error.__cause__ or error) from error
    return _fx_dataflow(model, gm, inputs, tracer.returns)


_TRACED = "surgery_traced_int"


class _ShapeAndSizeProp(ShapeProp):
    """ShapeProp that also keeps the ints the graph computes (sizes read from tensors' shapes and
    arithmetic on them), so that calls sized by them can be read (see `Traced`)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, int) and not isinstance(result, bool):
            n.meta[_TRACED] = int(result)
        return result


def _input_mismatch(model: nn.Module, inputs: Sequence[Any], error: BaseException) -> PlanError:
    shapes = ", ".join(
        str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs
    )
    frame = _user_frame(error)
    return PlanError(
        f"the example inputs ({shapes}) do not fit {type(model).__name__}: {_first_line(error)}"
        f"{f' at {frame}' if frame else ''}. Pass inputs the model accepts, e.g. the shape of one training batch."
    )


def _example_shapes(inputs: Sequence[Any]) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]


def _scope(
    meta: dict[str, Any], scope_types: dict[str, str], calls: dict[str, set[str]]
) -> tuple[str, ...]:
    stack = meta.get("nn_module_stack") or {}
    paths = []
    for key, (path, cls) in stack.items():
        if not path:
            continue
        paths.append(path)
        scope_types[path] = cls if isinstance(cls, str) else cls.__name__
        calls.setdefault(path, set()).add(str(key))
    return tuple(paths)


def _rank(meta: Any) -> int:
    return len(meta.shape) if hasattr(meta, "shape") else 0


def _param_aliases(model: nn.Module) -> dict[str, list[str]]:
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        by_tensor.setdefault(id(tensor), []).append(name)
    return {
        n: [m for m in names if m != n]
        for names in by_tensor.values()
        if len(names) > 1
        for n in names
    }


def _module_kinds(model: nn.Module) -> dict[str, str]:
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    kinds = {}
    for path, module in model.named_modules():
        if path:
            has_children = next(module.children(), None) is not None
            kinds[path] = (
                "container"
                if isinstance(module, containers)
                else "block"
                if has_children
                else "leaf"
            )
    return kinds


def _finish(
    model: nn.Module,
    ops: dict[str, Op],
    placeholders: list[str],
    outputs: list[str],
    method: str,
    scope_types: dict[str, str],
    calls: dict[str, set[str]],
    inputs: Sequence[Any],
    returns: dict[str, bool],
) -> Dataflow:
    module_calls = {path: len(keys) for path, keys in calls.items()}
    for op in ops.values():
        if op.module is not None and op.kind != "input":
            module_calls.setdefault(op.module, 0)
    # leaf modules called several times show up as several ops with the same module
    leaf_counts: dict[str, int] = {}
    for op in ops.values():
        if op.module:
            leaf_counts[op.module] = leaf_counts.get(op.module, 0) + 1
    for path, count in leaf_counts.items():
        module_calls[path] = max(module_calls.get(path, 0), count)
    return Dataflow(
        ops=ops,
        inputs=placeholders[:1],
        side_inputs=placeholders[1:],
        outputs=outputs,
        method=method,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        module_calls=module_calls,
        scope_types=scope_types,
        module_kinds=_module_kinds(model),
        param_aliases=_param_aliases(model),
        example_shapes=_example_shapes(inputs),
        param_shapes={
            name: tuple(t.shape)
            for name, t in [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
        },
        returns_tensor=returns,
        constants={
            f"{path}.{name}" if path else name
            for path, module in model.named_modules(remove_duplicate=False)
            for name in module._non_persistent_buffers_set
        },
    )


def _fx_dataflow(
    model: nn.Module, gm: fx.GraphModule, inputs: Sequence[Any], returns: dict[str, bool]
) -> Dataflow:
    ops: dict[str, Op] = {}
    placeholders: list[str] = []
    outputs: list[str] = []
    scope_types: dict[str, str] = {}
    calls: dict[str, set[str]] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "output":  # the tensors anywhere in what forward returns (dataclasses too)
            outputs = [n.name for n in dict.fromkeys(_returned(node.args, ops))]
            continue
        meta = node.meta.get("tensor_meta")
        if node.op == "get_attr" or meta is None:
            continue
        tensor_inputs = [n.name for n in node.all_input_nodes if n.name in ops]
        param_args = [n for n in node.all_input_nodes if n.op == "get_attr"]
        shape = tuple(meta.shape) if isinstance(meta, TensorMetadata) else None
        dtype = meta.dtype if isinstance(meta, TensorMetadata) else None
        scope = _scope(node.meta, scope_types, calls)
        first_rank = (
            _rank(ops[tensor_inputs[0]]) if tensor_inputs and ops[tensor_inputs[0]].shape else 0
        )
        module = None
        params: dict[str, str] = {}
        if node.op == "placeholder":
            kind, attrs, label = "input", {}, node.target
            placeholders.append(node.name)
        elif node.op == "call_module":
            sub = modules[node.target]
            qkv = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")]
            one = len({id(a) for a in qkv if isinstance(a, fx.Node)}) == 1  # e.g. q = k = v
            kind, attrs = normalize.classify_module(sub, one_activation=one)
            label, module = type(sub).__name__, node.target
            params = {
                role: f"{node.target}.{role}"
                for role, value in _module_tensors(sub).items()
                if value is not None
            }
        elif node.op == "call_function":
            n_tensors = len(tensor_inputs) + len(param_args)
            kind, attrs = normalize.classify_function(
                node.target, node.args, node.kwargs, n_tensors, first_rank
            )
            label = getattr(node.target, "__name__", str(node.target))
            if kind == "linear":
                params = {
                    role: arg.target
                    for role, arg in zip(("weight", "bias"), node.args[1:], strict=False)
                    if isinstance(arg, fx.Node) and arg.op == "get_attr"
                }
                kind, attrs = normalize.layer_reads_parameters(kind, attrs, params)
        else:  # call_method
            n_tensors = len(tensor_inputs) + len(param_args)
            kind, attrs = normalize.classify_method(
                node.target, node.args[1:], node.kwargs, n_tensors, first_rank
            )
            label = f".{node.target}()"
        kind, attrs = normalize.in_context(kind, attrs, label, len(tensor_inputs), len(param_args))
        if node.op in ("call_function", "call_method"):
            attrs = {**attrs, **_fx_call(node, ops)}
        ops[node.name] = Op(
            name=node.name,
            kind=kind,
            op=label,
            inputs=tensor_inputs,
            shape=shape,
            dtype=dtype,
            module=module,
            params=params,
            attrs=attrs,
            scope=scope,
            source=(node.stack_trace or "").strip().splitlines()[-1].strip()
            if node.stack_trace
            else None,
        )
    return _finish(
        model,
        ops,
        placeholders,
        outputs,
        "torch.fx.symbolic_trace",
        scope_types,
        calls,
        inputs,
        returns,
    )


def _returned(value: Any, ops: dict[str, Op]) -> list[fx.Node]:
    """The tensor nodes a forward returns, through the containers it builds them into (a
    dataclass or NamedTuple constructed in forward is a call of its class in the trace)."""
    found = []
    for n in _nodes_in(value):
        if n.name in ops:
            found.append(n)
        elif n.op == "call_function" and isinstance(n.target, type):
            found.extend(_returned((n.args, n.kwargs), ops))
    return found


def _nodes_in(value: Any) -> list[fx.Node]:
    """The graph nodes inside a returned value: tensors in tuples, lists, dicts (ModelOutput) and
    dataclass instances, in order."""
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes_in(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _nodes_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [n for f in dataclasses.fields(value) for n in _nodes_in(getattr(value, f.name))]
    return []


def _fx_call(node: fx.Node, ops: dict[str, Op]) -> dict[str, Any]:
    """The call record of an fx call_function / call_method node (see `Op.attrs`)."""

    def ref(n: fx.Node) -> Ref | Traced:
        if n.name in ops:
            return Ref(op=n.name)
        if n.op == "get_attr":
            return Ref(param=n.target)
        value = n.meta.get(_TRACED)
        return Traced(value) if value is not None else Ref()

    fn = node.target if node.op == "call_method" else _short(node.target)
    return {
        "fn": _OPERATOR_NAMES.get(fn, fn),
        "args": _recorded(node.args, ref),
        "kwargs": _recorded(dict(node.kwargs), ref),
    }


# Python operators and their torch names (the analysis speaks torch)
_OPERATOR_NAMES = {
    "truediv": "div",
    "iadd": "add",
    "imul": "mul",
    "isub": "sub",
    "itruediv": "div",
    "matmul": "matmul",
    "floordiv": "floor_divide",
    "neg": "neg",
    "pow": "pow",
    "and_": "bitwise_and",
    "or_": "bitwise_or",
    "invert": "bitwise_not",
    "eq": "eq",
    "ne": "ne",
    "lt": "lt",
    "gt": "gt",
    "le": "le",
    "ge": "ge",
}


def _recorded(value: Any, ref: Any) -> Any:
    """A call argument with every graph node replaced by ref(node), recursively."""
    if isinstance(value, fx.Node):
        return ref(value)
    if isinstance(value, (list, tuple)):
        return (
            type(value)(_recorded(v, ref) for v in value)
            if isinstance(value, tuple)
            else [_recorded(v, ref) for v in value]
        )
    if isinstance(value, dict):
        return {k: _recorded(v, ref) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(
            _recorded(value.start, ref), _recorded(value.stop, ref), _recorded(value.step, ref)
        )
    return value


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor | None]:
    found: dict[str, torch.Tensor | None] = dict(module.named_parameters(recurse=False))
    found.update(
        {k: v for k, v in module.named_buffers(recurse=False) if k != "num_batches_tracked"}
    )
    return found


def _capture_export(
    model: nn.Module, inputs: tuple[Any, ...], fx_msg: str, keywords: dict[str, Any]
) -> Dataflow:
    returns: dict[str, bool] = {}
    try:
        with _eval_mode(model), _recording_returns(model, returns):
            program = torch.export.export(model, inputs, kwargs=keywords, strict=False)
    except Exception as error:  # noqa: BLE001
        frame = _user_frame(error)
        raise CaptureError(
            f"cannot capture {type(model).__name__}. {fx_msg}. torch.export.export(strict=False) also failed"
            f"{f' at {frame}' if frame else ''}: {_first_line(error)}. Fix: make control flow depend on "
            "shapes, not tensor values (torch.where / torch.cond), or wrap the offending code in a "
            "submodule and pass plain tensors as example_inputs."
        ) from error
    return _export_dataflow(model, program, inputs, returns)


@contextlib.contextmanager
def _recording_returns(model: nn.Module, returns: dict[str, bool]) -> Iterator[None]:
    """Record, for every module called while tracing, whether it returns one plain tensor (a
    Hugging Face encoder returns a ModelOutput: no hook can read one tensor there)."""

    def hook(path: str) -> Any:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            returns[path] = returns.get(path, True) and isinstance(out, torch.Tensor)

        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in model.named_modules() if p]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _export_dataflow(
    model: nn.Module,
    program: torch.export.ExportedProgram,
    inputs: Sequence[Any],
    returns: dict[str, bool],
) -> Dataflow:
    sig = program.graph_signature
    param_names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    user_inputs = set(sig.user_inputs)
    ops: dict[str, Op] = {}
    placeholders: list[str] = []
    scope_types: dict[str, str] = {}
    calls: dict[str, set[str]] = {}
    modules = dict(model.named_modules())
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                placeholders.append(node.name)
                ops[node.name] = Op(
                    node.name, "input", node.target, shape=tuple(val.shape), dtype=val.dtype
                )
    same = _identities(program.graph)
    for leaf, members in _leaf_calls(program.graph, modules):
        escaping = _escaping(members, same)
        if leaf is not None and len(escaping) == 1:
            op = _module_call_op(leaf, modules[leaf], members, escaping[0], ops, same)
            op.scope = _scope(escaping[0].meta, scope_types, calls)
            ops[op.name] = op
            continue
        for node in (m for m in members if m.name not in same):
            op = _aten_op(node, ops, param_names, same)
            if op is not None:
                op.scope = _scope(node.meta, scope_types, calls)
                ops[op.name] = op
    outputs = [_resolve(n, same) for n in program.graph.output_node().all_input_nodes]
    outputs = [n for n in outputs if n in ops]
    return _finish(
        model, ops, placeholders, outputs, "torch.export", scope_types, calls, inputs, returns
    )


def _leaf_path(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The outermost module on the node's stack that fx would treat as one call (Linear, Conv, ...)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path in modules and normalize.is_leaf(modules[path]):
            return path
    return None


_IDENTITY_OPS = {"to", "_to_copy", "alias", "clone", "contiguous", "lift_fresh_copy", "detach"}


def _identities(graph: fx.Graph) -> dict[str, str]:
    """Nodes that return their input unchanged (a cast to the same dtype, an alias): node -> input."""
    same: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_function" and _short(node.target) in _IDENTITY_OPS and node.args:
            src, val = node.args[0], node.meta.get("val")
            src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
            if (
                isinstance(val, torch.Tensor)
                and isinstance(src_val, torch.Tensor)
                and val.dtype == src_val.dtype
                and val.shape == src_val.shape
            ):
                same[node.name] = _resolve(src, same)
    return same


def _resolve(node: fx.Node, same: dict[str, str]) -> str:
    return same.get(node.name, node.name)


def _leaf_calls(
    graph: fx.Graph, modules: dict[str, nn.Module]
) -> list[tuple[str | None, list[fx.Node]]]:
    """call_function nodes in order, consecutive nodes of one leaf-module call grouped together."""
    calls: list[tuple[str | None, list[fx.Node]]] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        leaf = _leaf_path(node, modules)
        if leaf is not None and calls and calls[-1][0] == leaf:
            calls[-1][1].append(node)
        else:
            calls.append((leaf, [node]))
    return calls


def _escaping(members: list[fx.Node], same: dict[str, str]) -> list[fx.Node]:
    """Members whose value is used after the call (identities stand for their input, not themselves)."""
    inside = set(members)
    return [m for m in members if m.name not in same and any(u not in inside for u in m.users)]


def _is_tensor_valued(val: Any) -> bool:
    return isinstance(val, torch.Tensor) or (
        isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)
    )


def _module_call_op(
    path: str,
    module: nn.Module,
    members: list[fx.Node],
    out: fx.Node,
    ops: dict[str, Op],
    same: dict[str, str],
) -> Op:
    """One op for the aten nodes of one leaf-module call, like fx's call_module node."""
    inside = {m.name for m in members}
    inputs: list[str] = []
    for m in members:
        for name in (_resolve(n, same) for n in m.all_input_nodes):
            if name not in inside and name in ops and name not in inputs:
                inputs.append(name)
    kind, attrs = normalize.classify_module(module, one_activation=_one_activation(inputs, ops))
    val = out.meta.get("val")
    return Op(
        name=out.name,
        kind=kind,
        op=type(module).__name__,
        inputs=inputs,
        shape=tuple(val.shape) if isinstance(val, torch.Tensor) else None,
        dtype=val.dtype if isinstance(val, torch.Tensor) else None,
        module=path,
        params={
            role: f"{path}.{role}" for role, t in _module_tensors(module).items() if t is not None
        },
        attrs=attrs,
        source=_source(out.meta.get("stack_trace")),
    )


def _one_activation(inputs: list[str], ops: dict[str, Op]) -> bool:
    """An attention call whose float inputs of the query's shape are one tensor: q = k = v."""
    first = ops[inputs[0]] if inputs else None
    same = [
        i for i in inputs if first and ops[i].shape == first.shape and ops[i].dtype == first.dtype
    ]
    return len(same) == 1


def _source(stack_trace: str | None) -> str | None:
    return stack_trace.strip().splitlines()[-1].strip() if stack_trace else None


def _aten_op(
    node: fx.Node, ops: dict[str, Op], param_names: dict[str, str], same: dict[str, str]
) -> Op | None:
    """One aten node outside any leaf-module call, or None if it produces no tensor."""
    val = node.meta.get("val")
    if not _is_tensor_valued(val):
        return None
    is_tensor = isinstance(val, torch.Tensor)
    tensor_inputs = [
        name for name in (_resolve(n, same) for n in node.all_input_nodes) if name in ops
    ]
    params = {}
    for role, arg in zip(
        _ATEN_PARAM_ROLES.get(_short(node.target), ()), _param_slots(node), strict=False
    ):
        if isinstance(arg, fx.Node) and arg.name in param_names:
            params[role] = param_names[arg.name]
    first_rank = len(ops[tensor_inputs[0]].shape or ()) if tensor_inputs else 0
    n_tensors = sum(
        1 for n in node.all_input_nodes if _resolve(n, same) in ops or n.name in param_names
    )
    kind, attrs = normalize.classify_aten(node.target, node.args, n_tensors, first_rank)
    kind, attrs = normalize.layer_reads_parameters(kind, attrs, params)
    label = str(node.target)
    kind, attrs = normalize.in_context(kind, attrs, label, len(tensor_inputs), 0)

    def ref(n: fx.Node) -> Ref:
        name = _resolve(n, same)
        if name in ops:
            return Ref(op=name)
        return Ref(param=param_names[n.name]) if n.name in param_names else Ref()

    attrs = {
        **attrs,
        "fn": _short(node.target),
        "args": _recorded(node.args, ref),
        "kwargs": _recorded(dict(node.kwargs), ref),
    }
    return Op(
        name=node.name,
        kind=kind,
        op=label,
        inputs=tensor_inputs,
        shape=tuple(val.shape) if is_tensor else None,
        dtype=val.dtype if is_tensor else None,
        params=params,
        attrs=attrs,
        source=_source(node.meta.get("stack_trace")),
    )


# aten ops that read parameters, and the roles of their parameter arguments in order
_ATEN_PARAM_ROLES = {
    "linear": ("weight", "bias"),
    "conv1d": ("weight", "bias"),
    "conv2d": ("weight", "bias"),
    "conv3d": ("weight", "bias"),
    "convolution": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var"),
    "_native_batch_norm_legit_no_training": ("weight", "bias", "running_mean", "running_var"),
    "embedding": ("weight",),
}


def _short(target: Any) -> str:
    """'conv2d' for aten.conv2d.default, 'getitem' for operator.getitem."""
    text = str(target)
    return text.split(".")[1] if text.startswith("aten.") else getattr(target, "__name__", text)


def _param_slots(node: fx.Node) -> list[Any]:
    if _short(node.target) == "embedding":
        return [node.args[0]]
    return list(node.args[1:])
