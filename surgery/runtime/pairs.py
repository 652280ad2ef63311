"""The widen/narrow pair module, its initialisations, and reading the WIN probes M1(h)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from surgery.runtime.models import unwrap

if TYPE_CHECKING:
    from .plan import Site


def _to_last(x: torch.Tensor, axis: int, d: int, inner: int) -> torch.Tensor:
    """Move the pair's feature index (size d, inside axis `axis`) to the last dim."""
    if inner == 1 and x.shape[axis] == d:
        return x.movedim(axis, -1)
    return x.unflatten(axis, (-1, d, inner)).movedim(axis + 1, -1)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear map on dim 1 of an N x C x ... tensor, as a 1x1 convolution: no transposed copies."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    return conv(x, weight.view(*weight.shape, *[1] * (x.dim() - 2)), bias)


def _from_last(y: torch.Tensor, axis: int, inner: int, like: torch.Size) -> torch.Tensor:
    """Inverse of _to_last (the last dim may now have another size, e.g. D for the probe)."""
    if inner == 1 and len(like) == y.dim():
        return y.movedim(-1, axis)
    return y.movedim(-1, axis + 1).flatten(axis, axis + 2)


def same_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`x` with the strides of `like` (same shape): a pair must not change the layout the model's own
    layers see (a channels-last activation, or a 1x1 conv weight with channels-last strides, makes
    the rest of a CNN run channels-last; a non-contiguous one breaks a later .view())."""
    if x.stride() == like.stride():
        return x
    return torch.empty_like(like, dtype=x.dtype, device=x.device).copy_(x)  # differentiable


def map_features(
    h: torch.Tensor,
    maps: list[tuple[torch.Tensor, torch.Tensor | None]],
    d: int,
    axis: int = -1,
    inner: int = 1,
    first: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The linear `maps` (weight, bias) applied in turn to the d features of `h` on `axis`
    (features possibly interleaved: index = (o*d + c)*inner + j), in `h`'s layout; `first` is
    given the output of the first map (the probe M1(h)), laid out like `h`."""
    axis = axis % h.dim()
    channels_first = axis == 1 and inner == 1 and 3 <= h.dim() <= 5 and h.shape[1] == d
    x = h if channels_first else _to_last(h, axis, d, inner)
    for i, (weight, bias) in enumerate(maps):
        x = _pointwise(x, weight, bias) if channels_first else F.linear(x, weight, bias)
        if i == 0 and first is not None:
            first(x if channels_first else _from_last(x, axis, inner, h.shape))
    return same_layout(x if channels_first else _from_last(x, axis, inner, h.shape), h)


def random_maps(d: int, D: int, bias: bool, narrow: bool = True) -> dict[str, torch.Tensor]:
    """A generic non-identity pair's tensors by role, unit gain on average (drawn in float32, five
    times faster than float64 normals, which the self-check's many pairs feel)."""
    maps = {"widen.weight": torch.randn(D, d) / d**0.5}
    if bias:
        maps["widen.bias"] = 0.1 * torch.randn(D)
    if narrow:
        maps["narrow.weight"] = torch.randn(d, D) / D**0.5
        if bias:
            maps["narrow.bias"] = 0.1 * torch.randn(d)
    return maps


# surgery.set_premerged policies (see there); a Pair's `premerged` is False or one of these
PREMERGE_POLICIES = ("auto", "always")


class Pair(nn.Module):
    """widen M1: d -> D, then narrow M2: D -> d, acting on one feature axis of a tensor.

    `probe` holds M1(h) from the last forward while recording (see surgery.probe)."""

    def __init__(
        self, d: int, D: int, *, bias: bool = False, narrow: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.widen = nn.Linear(d, D, bias=bias, device=device, dtype=dtype)
        # a probe-only site reads M1(h) and inserts nothing, so it has no narrow map
        self.narrow = nn.Linear(D, d, bias=bias, device=device, dtype=dtype) if narrow else None
        self.recording = False
        self.premerged: bool | str = False  # or a policy: see surgery.set_premerged
        self.probe: torch.Tensor | None = None

    @property
    def d(self) -> int:
        return self.widen.in_features

    @property
    def D(self) -> int:
        return self.widen.out_features

    def forward(
        self,
        h: torch.Tensor,
        axis: int = -1,
        inner: int = 1,
        *,
        add_bias: bool = True,
        record: bool = False,
        mixing: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M2(M1(h)) on `axis` (features possibly interleaved: index = (o*d + c)*inner + j); given
        `mixing` (W = M2 M1, formed once for the whole batch), W h + c in one map and no probe."""
        if mixing is not None:
            maps = [(mixing, self.shift() if add_bias else None)]
        else:
            maps = [(m.weight, m.bias if add_bias else None) for m in (self.widen, self.narrow)]
        record = record and self.recording and mixing is None
        return map_features(h, maps, self.d, axis, inner, self._keep_probe if record else None)

    def _keep_probe(self, wide: torch.Tensor) -> None:
        self.probe = wide

    def record(self, h: torch.Tensor, axis: int) -> None:
        """Store the probe M1(h) without running the narrow map (a probe-only read)."""
        if self.recording:
            wide = self.widen(h.movedim(axis, -1))
            self.probe = wide.movedim(-1, axis)

    def mixing(self) -> torch.Tensor:
        """W = M2 M1, differentiable, in the pair's dtype."""
        return self.narrow.weight @ self.widen.weight

    def shift(self) -> torch.Tensor | None:
        """c = M2 b1 + b2 (None for a pair without biases), differentiable."""
        if self.widen.bias is None:
            return None
        return self.narrow.weight @ self.widen.bias + self.narrow.bias

    @torch.no_grad()
    def product(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, c) in float64: the pair maps h to W h + c (see `pair_map`)."""
        return pair_map(self.widen.weight, self.narrow.weight, self.widen.bias, self.narrow.bias)

    def extra_repr(self) -> str:
        return f"d={self.d}, D={self.D}, bias={self.widen.bias is not None}"


def pair_map(
    m1: torch.Tensor, m2: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one definition of what a pair computes, in float64: W = M2 M1 and c = M2 b1 + b2 (None
    without biases), so that the pair maps h to W h + c. Used by `Pair.product` and the fold."""
    W = m2.double() @ m1.double()
    if b1 is None:
        return W, None
    return W, m2.double() @ b1.double() + b2.double()


class PairDict(nn.ModuleDict):
    """The pairs of a paired model, looked up by site name (`paired.pairs["layer1"]`).

    Calling it returns its input unchanged: an nn.Sequential root calls every child in turn, the
    pairs included (they run from hooks, not from there)."""

    def __init__(self, pairs: dict[str, tuple[str, Pair]]) -> None:
        super().__init__()
        self.names: dict[str, str] = {}  # site name -> module key
        for name, (key, pair) in pairs.items():
            self.names[name] = key
            self.add_module(key, pair)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __getitem__(self, name: str) -> Pair:
        return self._modules[self.names.get(name, name)]  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def keys(self):  # type: ignore[override]
        return self.names.keys()

    def items(self):  # type: ignore[override]
        return [(name, self[name]) for name in self.names]

    def values(self):  # type: ignore[override]
        return [self[name] for name in self.names]


InitFn = Callable[[Pair, "Site"], None]


@torch.no_grad()
def init_identity(pair: Pair, site: Site | None = None) -> None:
    """M1 = Q with orthonormal columns (a random D x d slice of an orthogonal matrix), M2 = Qᵀ:
    M2 M1 = I to float precision, and both maps get gradients (unlike a zero-padded identity)."""
    q, r = torch.linalg.qr(torch.randn(pair.D, pair.d, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    pair.widen.weight.copy_(q)
    if pair.widen.bias is not None:
        pair.widen.bias.zero_()
    if pair.narrow is not None:
        pair.narrow.weight.copy_(q.T)
        if pair.narrow.bias is not None:
            pair.narrow.bias.zero_()


@torch.no_grad()
def init_random(pair: Pair, site: Site | None = None) -> None:
    """A generic non-identity pair (`random_maps`), for tests and experiments."""
    maps = random_maps(pair.d, pair.D, pair.widen.bias is not None, pair.narrow is not None)
    for role, tensor in pair.state_dict().items():
        tensor.copy_(maps[role])


INITS: dict[str, InitFn] = {"identity": init_identity, "random": init_random}


class Probes:
    """Live view of the recorded probes: `probes[site]` is M1(h) from the last forward."""

    def __init__(self, pairs: PairDict, names: list[str]) -> None:
        self._pairs = pairs
        self.names = names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"{name!r} is not probed; probed sites: {', '.join(self.names)}")
        probe = self._pairs[name].probe
        if probe is None:
            raise LookupError(
                f"no probe for {name!r} yet: run a forward pass inside the `with` block first"
            )
        return probe

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, self[n]) for n in self.names]


def set_premerged(paired: nn.Module, enabled: bool | str = True) -> None:
    """Pre-merged training mode: each layer (Linear/Conv/Embedding) that absorbs pairs runs with them
    merged into its weights on the fly, so a step's per-sample cost is the thin model's; results equal
    the plain paired forward to float rounding and gradients still reach M1 and M2.

    enabled: True or "auto" (merge a layer when that costs fewer multiply-adds than running its pairs
    on the batch; a classifier head after pooling keeps its pairs on the activations), "always"
    (merge every such layer), or False (off)."""
    policy = "auto" if enabled is True else enabled
    if policy is not False and policy not in PREMERGE_POLICIES:
        raise ValueError(
            f"premerged mode must be True, False, or one of {PREMERGE_POLICIES}, got {enabled!r}"
        )
    for pair in _pairs_of(paired).values():
        pair.premerged = policy


@contextlib.contextmanager
def premerged(paired: nn.Module, policy: bool | str = "auto") -> Iterator[nn.Module]:
    """`with surgery.premerged(paired):` train in pre-merged mode inside the block (see set_premerged
    for `policy`); the previous mode is restored on exit."""
    before = {name: pair.premerged for name, pair in _pairs_of(paired).items()}
    set_premerged(paired, policy)
    try:
        yield paired
    finally:
        for name, pair in _pairs_of(paired).items():
            pair.premerged = before[name]


def is_paired(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a DDP / torch.compile wrapper) carries surgery pairs."""
    return isinstance(getattr(unwrap(model), "pairs", None), PairDict)


def _pairs_of(paired: nn.Module) -> PairDict:
    if not is_paired(paired):
        raise TypeError(
            f"{type(paired).__name__} is not a paired model: pass the result of surgery.insert_pairs"
        )
    return unwrap(paired).pairs


@contextlib.contextmanager
def probe(paired: nn.Module, sites: list[str] | None = None) -> Iterator[Probes]:
    """Record the WIN probes M1(h) of `sites` (default: every site that has one) during forwards.

        with surgery.probe(paired) as probes:
            paired(x)
            loss = sum(mse(probes[s], teacher_out[s]) for s in probes)

    Probes keep their autograd graph (gradients reach M1 and the blocks before it). Recording is off
    outside the block, so training without imitation pays nothing for the probes."""
    plan = paired.plan
    pairs: PairDict = paired.pairs
    available = [s.name for s in plan.sites if s.probe is not None]
    names = available if sites is None else list(sites)
    for name in names:
        site = plan.site(name)
        if site.probe is None:
            raise KeyError(
                f"site {name!r} has no probe: h is neither the output of a module called once nor the input of one"
            )
    for name in names:
        pairs[name].recording = True
    try:
        yield Probes(pairs, names)
    finally:
        for name in names:
            pairs[name].recording = False
            pairs[name].probe = None
