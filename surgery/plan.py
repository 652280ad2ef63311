"""The Plan: pure, JSON-serialisable data saying where each pair sits and how it folds.

A fold recipe names parameters of the original model, so folding needs no model code: it is tensor
algebra on a state_dict (see surgery.runtime.fold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surgery.files.jsontext import dataclass_json, from_data, parse_json

PLAN_VERSION = 1
PROBE_ONLY = (
    "probe only"  # a Route kind: the site has a widen map for the WIN probe and folds nothing
)


@dataclass
class Target:
    """One parameter update of a fold: `rule` (see surgery.rewrites.RULES) applied to `params`."""

    rule: str
    params: dict[str, str]  # role -> parameter name in the original state_dict
    axis: int = 0  # the dim of the weight the pair acts on
    out_axis: int = 0  # the weight's output dim (for input-bias sums)
    outer: int = 1
    inner: int = 1
    eps: float | None = None
    add_bias: bool = True  # the pair bias goes here (a sum of several writers takes it once)
    groups: int = 1  # channel groups of the weight (a factor contraction multiplies per group)


@dataclass
class Placement:
    """Where the paired model applies (or reads) the pair: a hook on `module`'s input or output."""

    module: str
    where: str  # "input" (args[0] before the call) or "output" (the returned tensor)
    axis: int
    outer: int = 1
    inner: int = 1
    bias: bool = True  # add the pair's bias here (a sum of several writers takes it once)


@dataclass
class Route:
    """How a boundary folds: which parameters absorb the pair, and where the pair runs until then."""

    kind: str  # "consumer", "producer", "producer through BatchNorm", "producer embedding", ..., PROBE_ONLY
    targets: list[Target]
    placements: list[Placement]
    absorbed_by: list[str]  # parameter names, for people
    kept: dict[str, str] = field(default_factory=dict)  # consumer edges that keep h -> why
    notes: list[str] = field(default_factory=list)


@dataclass
class Site:
    """A pair in a paired model: the boundary it sits on, its widths and its fold recipe."""

    name: str
    tensor: str
    shape: list[int]
    feature_axis: int
    d: int
    D: int
    bias: bool
    route: Route
    probe: Placement | None
    key: str  # the pair's module key under `paired.pairs`
    params: dict[str, str]  # "widen.weight" -> state_dict key in the paired model


MAX_SIZE = 2**40  # no tensor dim a plan describes is this large: a larger one is corrupted


def _sizes(shape: list[int], what: str) -> None:
    if any(n < 0 or n > MAX_SIZE for n in shape):
        raise ValueError(f"{what} {shape} holds a negative or impossibly large size")


def pair_param_name(key: str, role: str) -> str:
    """The state_dict key of a pair tensor: `pairs.<site key>.<role>` (role e.g. widen.weight)."""
    return f"pairs.{key}.{role}"


def pair_roles(probe_only: bool, bias: bool) -> list[str]:
    """The pair tensors a site has: a widen map (the probe), a narrow map unless probe-only, and
    their biases when the pair has one."""
    maps = ("widen",) if probe_only else ("widen", "narrow")
    return [f"{m}.{p}" for m in maps for p in (("weight", "bias") if bias else ("weight",))]


@dataclass
class Plan:
    """Where every pair of a paired model sits and how it folds: the sites, with the model class,
    capture back end and example shapes it was planned on. JSON via `to_json` / `Plan.from_json`,
    so a checkpoint can be folded with no model code."""

    model_class: str
    capture: str
    example_shapes: list[list[int]]
    sites: list[Site]
    version: int = PLAN_VERSION

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"no site named {name!r}; sites: {', '.join(s.name for s in self.sites)}")

    def pair_keys(self) -> set[str]:
        return {key for site in self.sites for key in site.params.values()}

    def validate(self) -> None:
        """Raise ValueError unless the plan is self-consistent: unique site names and keys, each
        site's pair tensors exactly the ones its kind has (named pairs.<key>.<role>), and no pair
        tensor that is also a model tensor a recipe writes (the fold would drop it)."""
        for what, values in (
            ("site name", [s.name for s in self.sites]),
            ("site key", [s.key for s in self.sites]),
        ):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"the {what} {twice[0]!r} appears twice: each site must be unique")
        for shape in self.example_shapes:
            _sizes(shape, "example_shapes")
        for site in self.sites:
            _sizes(site.shape, f"site {site.name!r} shape")
            if site.d < 1 or site.D < 1 or not 0 <= site.feature_axis < max(len(site.shape), 1):
                raise ValueError(
                    f"site {site.name!r}: widths d={site.d}, D={site.D} and feature axis "
                    f"{site.feature_axis} do not fit its shape {site.shape}"
                )
            placements = list(site.route.placements) + ([site.probe] if site.probe else [])
            for p in placements:
                if p.where not in ("input", "output") or p.axis < 0 or p.outer < 1 or p.inner < 1:
                    raise ValueError(f"site {site.name!r}: a placement {p} that cannot be applied")
            for t in site.route.targets:
                if not t.params:
                    raise ValueError(f"site {site.name!r}: a target {t.rule!r} names no tensor")
                if t.axis < 0 or t.out_axis < 0 or t.outer < 1 or t.inner < 1 or t.groups < 1:
                    raise ValueError(f"site {site.name!r}: a target {t} with impossible sizes")
        targets = {n for s in self.sites for t in s.route.targets for n in t.params.values()}
        for site in self.sites:
            expected = {
                role: pair_param_name(site.key, role)
                for role in pair_roles(site.route.kind == PROBE_ONLY, site.bias)
            }
            if site.params != expected:
                raise ValueError(
                    f"site {site.name!r} lists pair tensors {sorted(site.params.values())}, "
                    f"not {sorted(expected.values())} (its kind and bias)"
                )
            claimed = sorted(targets & set(expected.values()))
            if claimed:
                raise ValueError(
                    f"site {site.name!r}: {claimed[0]} is both a pair tensor and a model tensor "
                    "a recipe writes"
                )

    def to_json(self, indent: int | None = 1) -> str:
        return dataclass_json(self, indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(parse_json(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"plan version {data.get('version')!r} is not {PLAN_VERSION}: re-plan with this surgery"
            )
        plan = from_data(cls, data)
        plan.validate()
        return plan
