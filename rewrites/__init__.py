"""Fold rules, one family per module, and the insert pass.

A rule module exports `CONSUMERS`, `PRODUCERS` (rules behind the interface of `rule.py`) and the
`ALGEBRA` of the Target rules its folds use; this package imports every module in it and collects
them, so a new family is one new module here (and its tests), listed nowhere else. Each rule's
`check` says why it does not apply (so find_blocks can say *why not*); its `fold` gives the site's
`Target`s (parameter updates) and `Placement`s (where the paired model runs the pair). `RULES` maps
a Target's rule name to its algebra, which both the fold (float64, on a state_dict) and pre-merged
training (under autograd, on a live layer) apply.
"""

from __future__ import annotations

import importlib
import pkgutil

from .rule import Algebra, ConsumerRule, ProducerRule

# the machinery around the rules (imported by them, or importing RULES), not rule families
_SUPPORT = {"algebra", "channel_ops", "common", "insert", "merged", "rule"}


def _collect() -> tuple[list[ConsumerRule], list[ProducerRule], dict[str, Algebra]]:
    consumers: list[ConsumerRule] = []
    producers: list[ProducerRule] = []
    rules: dict[str, Algebra] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _SUPPORT:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        consumers += getattr(module, "CONSUMERS", ())
        producers += getattr(module, "PRODUCERS", ())
        for name, algebra in getattr(module, "ALGEBRA", {}).items():
            if name in rules:
                raise ImportError(f"fold rule {name!r} is defined twice (in {info.name})")
            rules[name] = algebra
    return consumers, producers, rules


CONSUMER_RULES, PRODUCER_RULES, RULES = _collect()
