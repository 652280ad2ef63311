"""Property tests of the pure fold algebra (surgery.rewrites.algebra, the RULES table and
channel_ops.reshape_layout) against direct float64 computations: apply the pair, run the layer, and
compare with the layer whose weights the rule rewrote."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import examples
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from surgery.rewrites import RULES, algebra
from surgery.rewrites.channel_ops import reshape_layout

from surgery.ir.graph import Layout
from surgery.plan import Target

TOL = 1e-10
SETTINGS = settings(
    max_examples=examples(200),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def rel_err(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |ref - cand| / max |ref| (never a signed sum)."""
    assert reference.shape == candidate.shape, (reference.shape, candidate.shape)
    scale = reference.abs().max().clamp_min(1e-300)
    return ((reference - candidate).abs().max() / scale).item()


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def kron_pair(W: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """The dense matrix I_outer ⊗ W ⊗ I_inner."""
    eye = torch.eye
    return torch.kron(torch.kron(eye(outer, dtype=W.dtype), W), eye(inner, dtype=W.dtype))


def apply_pair(
    x: torch.Tensor, W: torch.Tensor, axis: int, outer: int = 1, inner: int = 1, c=None
) -> torch.Tensor:
    """(I ⊗ W ⊗ I) x + (1 ⊗ c ⊗ 1) on axis `axis`, by a dense matrix product."""
    M = kron_pair(W, outer, inner)
    y = x.movedim(axis, -1) @ M.T
    if c is not None:
        y = y + torch.kron(
            torch.kron(torch.ones(outer, dtype=c.dtype), c), torch.ones(inner, dtype=c.dtype)
        )
    return y.movedim(-1, axis)


def channel_mix(h: torch.Tensor, W: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """W h (+ c) on the channel axis 1 of an (N, C, ...) tensor."""
    y = torch.einsum("ij,nj...->ni...", W, h)
    if c is not None:
        y = y + c.reshape(1, -1, *([1] * (h.dim() - 2)))
    return y


@st.composite
def conv_geometry(draw, padding: bool = True):
    """(dims, kernel, stride, padding, dilation, spatial input size) with a non-empty output."""
    dims = draw(st.sampled_from([1, 2, 3]))
    kernel, stride, pad, dil, size = [], [], [], [], []
    for _ in range(dims):
        k = draw(st.integers(1, 3))
        s = draw(st.integers(1, 2))
        p = draw(st.integers(0, 2)) if padding else 0
        dl = draw(st.integers(1, 2))
        reach = dl * (k - 1) + 1
        n = draw(
            st.integers(max(1, reach - 2 * p), max(1, reach - 2 * p) + (3 if dims == 3 else 5))
        )
        kernel.append(k), stride.append(s), pad.append(p), dil.append(dl), size.append(n)
    return dims, tuple(kernel), tuple(stride), tuple(pad), tuple(dil), tuple(size)


seeds = st.integers(0, 2**31 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- absorb_input


@SETTINGS
@given(geo=conv_geometry(), d=st.integers(1, 5), out=st.integers(1, 4), seed=seeds)
def test_absorb_input_conv(geo, d, out, seed):
    dims, kernel, stride, pad, dil, size = geo
    g = torch.Generator().manual_seed(seed)
    A, b, W = randn(g, out, d, *kernel), randn(g, out), randn(g, d, d)
    h = randn(g, 2, d, *size)
    conv = CONV[dims]
    ref = conv(channel_mix(h, W), A, b, stride=stride, padding=pad, dilation=dil)
    folded = conv(
        h, algebra.absorb_input(A, W, axis=1), b, stride=stride, padding=pad, dilation=dil
    )
    assert rel_err(ref, folded) <= TOL


@SETTINGS
@given(
    d=st.integers(1, 5),
    outer=st.integers(1, 3),
    inner=st.integers(1, 4),
    out=st.integers(1, 4),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seed=seeds,
)
def test_absorb_input_linear(d, outer, inner, out, lead, seed):
    """A Linear reading (I_outer ⊗ W ⊗ I_inner) h: the feature block repeated `outer` times, each
    feature interleaved with `inner` other entries."""
    g = torch.Generator().manual_seed(seed)
    n_in = outer * d * inner
    A, b, W = randn(g, out, n_in), randn(g, out), randn(g, d, d)
    h = randn(g, *lead, n_in)
    ref = F.linear(apply_pair(h, W, -1, outer, inner), A, b)
    A2 = algebra.absorb_input(A, W, axis=1, outer=outer, inner=inner)
    assert A2.shape == A.shape
    assert rel_err(ref, F.linear(h, A2, b)) <= TOL
    # the same through the RULES table, as fold_state_dict calls it
    t = Target("input_weight", {"weight": "fc.weight"}, axis=1, outer=outer, inner=inner)
    assert torch.equal(RULES["input_weight"](t, {"weight": A}, W, None)["weight"], A2)


@SETTINGS
@given(
    C=st.integers(1, 5),
    H=st.integers(1, 4),
    Wd=st.integers(1, 4),
    out=st.integers(1, 4),
    seed=seeds,
)
def test_absorb_input_linear_reads_flatten(C, H, Wd, out, seed):
    """Linear(flatten([N, C, H, W])) absorbs W ⊗ I_{HW}: inner = H*W."""
    g = torch.Generator().manual_seed(seed)
    A, b, W = randn(g, out, C * H * Wd), randn(g, out), randn(g, C, C)
    h = randn(g, 3, C, H, Wd)
    ref = F.linear(channel_mix(h, W).flatten(1), A, b)
    folded = F.linear(h.flatten(1), algebra.absorb_input(A, W, axis=1, inner=H * Wd), b)
    assert rel_err(ref, folded) <= TOL


# ---------------------------------------------------------------- absorb_input_bias


@SETTINGS
@given(geo=conv_geometry(padding=False), d=st.integers(1, 5), out=st.integers(1, 4), seed=seeds)
def test_absorb_input_bias_unpadded_conv(geo, d, out, seed):
    """conv(W h + c) == conv'(h): A' = A W, b' = b + Σ_taps A c (A before absorb_input)."""
    dims, kernel, stride, pad, dil, size = geo
    g = torch.Generator().manual_seed(seed)
    A, b, W, c = randn(g, out, d, *kernel), randn(g, out), randn(g, d, d), randn(g, d)
    h = randn(g, 2, d, *size)
    conv = CONV[dims]
    ref = conv(channel_mix(h, W, c), A, b, stride=stride, dilation=dil)
    b2 = algebra.absorb_input_bias(b, A, c, axis=1, out_axis=0)
    A2 = algebra.absorb_input(A, W, axis=1)
    assert b2.shape == b.shape
    assert rel_err(ref, conv(h, A2, b2, stride=stride, dilation=dil)) <= TOL
    # RULES order as LayerConsumer emits it: input_bias (reads the original weight), then input_weight
    t = Target("input_bias", {"weight": "w", "bias": "b"}, axis=1, out_axis=0)
    assert torch.equal(RULES["input_bias"](t, {"weight": A, "bias": b}, W, c)["bias"], b2)


@SETTINGS
@given(
    d=st.integers(1, 5),
    outer=st.integers(1, 3),
    inner=st.integers(1, 4),
    out=st.integers(1, 4),
    seed=seeds,
)
def test_absorb_input_bias_linear(d, outer, inner, out, seed):
    g = torch.Generator().manual_seed(seed)
    n_in = outer * d * inner
    A, b, W, c = randn(g, out, n_in), randn(g, out), randn(g, d, d), randn(g, d)
    h = randn(g, 4, n_in)
    ref = F.linear(apply_pair(h, W, -1, outer, inner, c), A, b)
    b2 = algebra.absorb_input_bias(b, A, c, axis=1, out_axis=0, outer=outer, inner=inner)
    A2 = algebra.absorb_input(A, W, axis=1, outer=outer, inner=inner)
    assert rel_err(ref, F.linear(h, A2, b2)) <= TOL


@settings(SETTINGS, max_examples=examples(100))
@given(geo=conv_geometry(), d=st.integers(1, 5), out=st.integers(1, 4), seed=seeds)
def test_absorb_input_bias_fails_with_zero_padding(geo, d, out, seed):
    """Why LayerConsumer refuses a pair bias into a zero-padded conv: padded taps see 0 where the
    paired model sees c, so the folded bias is wrong at the borders."""
    dims, kernel, stride, pad, dil, size = geo
    assume(any(p > 0 for p in pad))
    g = torch.Generator().manual_seed(seed)
    A, b, W = randn(g, out, d, *kernel), randn(g, out), randn(g, d, d)
    c = 1.0 + torch.rand(d, generator=g, dtype=torch.float64)  # clearly non-zero
    A = A.abs() + 0.1  # A c cannot vanish by cancellation
    h = randn(g, 2, d, *size)
    conv = CONV[dims]
    kw = {"stride": stride, "padding": pad, "dilation": dil}
    ref = conv(channel_mix(h, W, c), A, b, **kw)
    b2 = algebra.absorb_input_bias(b, A, c, axis=1, out_axis=0)
    folded = conv(h, algebra.absorb_input(A, W, axis=1), b2, **kw)
    assert rel_err(ref, folded) > 1e-2


# ---------------------------------------------------------------- absorb_output(_bias)


@SETTINGS
@given(
    geo=conv_geometry(),
    cin=st.integers(1, 4),
    d=st.integers(1, 5),
    layer_bias=st.booleans(),
    pair_bias=st.booleans(),
    linear=st.booleans(),
    seed=seeds,
)
def test_absorb_output(geo, cin, d, layer_bias, pair_bias, linear, seed):
    """W (A x + b) + c == (W A) x + (W b + c), for Linear and Conv, either bias absent."""
    dims, kernel, stride, pad, dil, size = geo
    g = torch.Generator().manual_seed(seed)
    W = randn(g, d, d)
    b = randn(g, d) if layer_bias else None
    c = randn(g, d) if pair_bias else None
    if linear:
        A, x = randn(g, d, cin), randn(g, 2, 3, cin)
        ref = apply_pair(F.linear(x, A, b), W, -1, c=c)
        folded = F.linear(
            x, algebra.absorb_output(A, W, axis=0), algebra.absorb_output_bias(b, W, c)
        )
    else:
        A, x = randn(g, d, cin, *kernel), randn(g, 2, cin, *size)
        conv = CONV[dims]
        kw = {"stride": stride, "padding": pad, "dilation": dil}
        ref = channel_mix(conv(x, A, b, **kw), W, c)
        folded = conv(
            x, algebra.absorb_output(A, W, axis=0), algebra.absorb_output_bias(b, W, c), **kw
        )
    assert rel_err(ref, folded) <= TOL


# ---------------------------------------------------------------- batchnorm_through


@SETTINGS
@given(
    kind=st.sampled_from(["linear", "conv1d", "conv2d"]),
    cin=st.integers(1, 4),
    d=st.integers(1, 6),
    layer_bias=st.booleans(),
    pair_bias=st.booleans(),
    eps=st.floats(1e-6, 0.5),
    seed=seeds,
)
def test_batchnorm_through(kind, cin, d, layer_bias, pair_bias, eps, seed):
    """W·BN_eval(A z + b0) + c == BN'_eval(A' z + b0') with random running stats, affine params, eps."""
    g = torch.Generator().manual_seed(seed)
    gamma = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    gamma = gamma * torch.where(torch.rand(d, generator=g) < 0.3, -1.0, 1.0).double()
    beta, mean = randn(g, d), 0.7 * randn(g, d)
    var = 0.2 + 2 * torch.rand(d, generator=g, dtype=torch.float64)
    W = randn(g, d, d)
    c = randn(g, d) if pair_bias else None
    b0 = randn(g, d) if layer_bias else None
    if kind == "linear":
        A, z = randn(g, d, cin), randn(g, 5, cin)
        layer = F.linear
    elif kind == "conv1d":
        A, z = randn(g, d, cin, 3), randn(g, 2, cin, 7)
        layer = F.conv1d
    else:
        A, z = randn(g, d, cin, 3, 2), randn(g, 2, cin, 6, 5)
        layer = F.conv2d

    def bn(y, m, v, w, bb, e):
        return F.batch_norm(y, m, v, w, bb, training=False, eps=e)

    ref = channel_mix(bn(layer(z, A, b0), mean, var, gamma, beta, eps), W, c)
    out = algebra.batchnorm_through(A, b0, gamma, beta, mean, var, eps, W, c, out_axis=0)
    assert ("producer_bias" in out) == layer_bias
    y = layer(z, out["producer_weight"], out.get("producer_bias"))
    folded = bn(y, out["running_mean"], out["running_var"], out["weight"], out["bias"], eps)
    assert rel_err(ref, folded) <= TOL
    for key, like in [
        ("running_mean", mean),
        ("running_var", var),
        ("weight", gamma),
        ("bias", beta),
    ]:
        assert out[key].shape == like.shape
    # the RULES entry wires the same algebra to a Target's roles
    params = {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}
    params["producer_weight"] = A
    if b0 is not None:
        params["producer_bias"] = b0
    t = Target("batchnorm_through", {k: k for k in params}, axis=0, eps=eps)
    via_rules = RULES["batchnorm_through"](t, params, W, c)
    assert via_rules.keys() == out.keys()
    for key in out:
        assert torch.equal(via_rules[key], out[key])


# ---------------------------------------------------------------- embedding table


@SETTINGS
@given(
    num=st.integers(1, 12),
    d=st.integers(1, 6),
    pair_bias=st.booleans(),
    ids_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=seeds,
)
def test_embedding_table(num, d, pair_bias, ids_shape, seed):
    g = torch.Generator().manual_seed(seed)
    E, W = randn(g, num, d), randn(g, d, d)
    c = randn(g, d) if pair_bias else None
    ids = torch.randint(0, num, ids_shape, generator=g)
    t = Target("embedding_table", {"weight": "emb.weight"}, axis=1)
    E2 = RULES["embedding_table"](t, {"weight": E}, W, c)["weight"]
    assert E2.shape == E.shape
    ref = apply_pair(F.embedding(ids, E), W, -1, c=c)
    assert rel_err(ref, F.embedding(ids, E2)) <= TOL


# ---------------------------------------------------------------- reshape_layout


def _factor_pairs(n: int) -> list[tuple[int, int]]:
    return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


@st.composite
def layout_and_reshape(draw):
    """A shape, a Layout on it, and a chain of reshapes that keep the feature block contiguous:
    merging adjacent dims, (un)squeezing size-1 dims, splitting a non-feature dim, and splitting the
    feature dim only between blocks (outer | d*inner or outer*d | inner)."""
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    axis = draw(st.integers(0, rank - 1))
    d = draw(st.integers(2, 5))
    outer, inner = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    shape[axis] = outer * d * inner
    start = (tuple(shape), Layout(axis, d, outer, inner))
    # track (shape, axis, outer, inner) through the chain so that splits never cut the block
    shape, lo = list(shape), [axis, outer, inner]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["merge", "unsqueeze", "squeeze", "split_other", "split_feature"])
        )
        ax = lo[0]
        if op == "merge" and len(shape) >= 2:
            i = draw(st.integers(0, len(shape) - 2))
            merged = shape[i] * shape[i + 1]
            if i == ax:  # feature axis merged with the one after it
                lo = [i, lo[1], lo[2] * shape[i + 1]]
            elif i + 1 == ax:  # merged with the one before it
                lo = [i, lo[1] * shape[i], lo[2]]
            elif i + 1 < ax:
                lo = [ax - 1, lo[1], lo[2]]
            shape[i : i + 2] = [merged]
        elif op == "unsqueeze" and len(shape) < 6:
            i = draw(st.integers(0, len(shape)))
            shape.insert(i, 1)
            if i <= ax:
                lo[0] += 1
        elif op == "squeeze":
            ones = [i for i, n in enumerate(shape) if n == 1 and i != ax]
            if ones:
                i = draw(st.sampled_from(ones))
                del shape[i]
                if i < ax:
                    lo[0] -= 1
        elif op == "split_other":
            others = [i for i, n in enumerate(shape) if i != ax and n > 1]
            if others and len(shape) < 6:
                i = draw(st.sampled_from(others))
                a, b = draw(st.sampled_from(_factor_pairs(shape[i])))
                shape[i : i + 1] = [a, b]
                if i < ax:
                    lo[0] += 1
        elif op == "split_feature" and len(shape) < 6:
            _, o, n = lo
            # split outer*d*inner as (o1, o2*d*inner) or (o*d*i1, i2)
            if draw(st.booleans()):
                o1, o2 = draw(st.sampled_from(_factor_pairs(o)))
                shape[ax : ax + 1] = [o1, o2 * d * n]
                lo = [ax + 1, o2, n]
            else:
                i1, i2 = draw(st.sampled_from(_factor_pairs(n)))
                shape[ax : ax + 1] = [o * d * i1, i2]
                lo = [ax, o, i1]
    return start, tuple(shape)


@settings(SETTINGS, max_examples=examples(300))
@given(case=layout_and_reshape(), seed=seeds)
def test_reshape_layout_commutes(case, seed):
    (in_shape, layout), out_shape = case
    moved = reshape_layout(layout, in_shape, out_shape)
    assert moved is not None, (layout, in_shape, out_shape)
    assert moved.d == layout.d
    assert moved.outer * moved.d * moved.inner == out_shape[moved.axis]
    g = torch.Generator().manual_seed(seed)
    x, W = randn(g, *in_shape), randn(g, layout.d, layout.d)
    ref = apply_pair(x, W, layout.axis, layout.outer, layout.inner).reshape(out_shape)
    got = apply_pair(x.reshape(out_shape), W, moved.axis, moved.outer, moved.inner)
    assert rel_err(ref, got) <= TOL


@st.composite
def any_reshape(draw):
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    axis = draw(st.integers(0, rank - 1))
    d = draw(st.integers(1, 4))
    outer, inner = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    shape[axis] = outer * d * inner
    numel = math.prod(shape)
    out, rest = [], numel
    while rest > 1 and len(out) < 5:
        a, _ = draw(st.sampled_from(_factor_pairs(rest)))
        out.append(a)
        rest //= a
    out.append(rest)
    out = draw(st.permutations(out))
    return tuple(shape), Layout(axis, d, outer, inner), tuple(out)


@settings(SETTINGS, max_examples=examples(300))
@given(case=any_reshape(), seed=seeds)
def test_reshape_layout_sound_for_any_reshape(case, seed):
    """Whatever reshape: when reshape_layout returns a layout, moving the pair through is exact."""
    in_shape, layout, out_shape = case
    moved = reshape_layout(layout, in_shape, out_shape)
    if moved is None:
        return
    assert moved.outer * moved.d * moved.inner == out_shape[moved.axis]
    g = torch.Generator().manual_seed(seed)
    x, W = randn(g, *in_shape), randn(g, layout.d, layout.d)
    ref = apply_pair(x, W, layout.axis, layout.outer, layout.inner).reshape(out_shape)
    got = apply_pair(x.reshape(out_shape), W, moved.axis, moved.outer, moved.inner)
    assert rel_err(ref, got) <= TOL


@pytest.mark.parametrize(
    "in_shape, layout, out_shape",
    [
        ((2, 5, 8), Layout(2, 8), (2, 5, 2, 4)),  # heads split: [N, L, C] -> [N, L, h, C/h]
        ((2, 5, 8), Layout(2, 8), (2, 5, 4, 2)),
        ((2, 12, 3, 3), Layout(1, 12), (2, 3, 4, 9)),  # channels split across two axes
        ((2, 6, 4), Layout(1, 6), (2, 2, 12)),  # [N, C, L] -> [N, 2, 3L]: block cut in two
        ((3, 2 * 4 * 3), Layout(1, 4, 2, 3), (3, 2, 2, 6)),  # cut inside d with outer/inner
    ],
)
def test_reshape_layout_refuses_splitting_the_feature_axis(in_shape, layout, out_shape):
    assert reshape_layout(layout, in_shape, out_shape) is None


@SETTINGS
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    heads=st.integers(2, 4),
    per_head=st.integers(2, 4),
)
def test_reshape_layout_refuses_head_split(lead, heads, per_head):
    C = heads * per_head
    in_shape = (*lead, C)
    out_shape = (*lead, heads, per_head)
    assert reshape_layout(Layout(len(lead), C), in_shape, out_shape) is None
