"""Fuzzing every file reader (bench/fuzz.py, a few hundred inputs per format here; the bench runs
20,000): start from valid files of each format, mutate fields, lengths, offsets, types and bytes,
and drive `surgery fold`, `surgery inspect`, `surgery.load` and the DCP reader. Every input must be
refused with exit 2 and one line, or fold to the reference; never a traceback, never an input
changed."""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from pathlib import Path

import pytest
from conftest import IN_CI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_SPEC = importlib.util.spec_from_file_location(
    "fuzz", Path(__file__).parents[1] / "bench" / "fuzz.py"
)
fuzz = importlib.util.module_from_spec(_SPEC)
sys.modules["fuzz"] = fuzz  # its factory is named "fuzz:fuzz_model": an imported module
_SPEC.loader.exec_module(fuzz)

PER_FORMAT = 300 if IN_CI else 60


@pytest.fixture(scope="module")
def valid(tmp_path_factory, one_thread):
    return fuzz.seeds(tmp_path_factory.mktemp("seeds"))


@pytest.mark.parametrize("fmt", fuzz.FORMATS)
def test_fuzzed_inputs_are_refused_in_one_line_or_fold_exactly(fmt, valid, tmp_path):
    cases = tmp_path / "cases"

    @settings(
        max_examples=PER_FORMAT,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(seed=st.integers(0, 2**32 - 1))
    def one(seed: int) -> None:
        case = cases / str(seed)
        case.mkdir(parents=True)
        try:
            files = fuzz.mutate(fmt, valid[fmt], random.Random(seed))
            outcome, detail = fuzz.run_case(fmt, valid[fmt], files, case)
        finally:
            shutil.rmtree(case, ignore_errors=True)
        assert outcome in ("refused", "accepted and correct"), (outcome, detail)

    one()


def test_the_valid_inputs_fold_to_the_reference(valid, tmp_path):
    """The fuzzer's oracle agrees with the command on the unmutated files of every format."""
    for fmt in fuzz.FORMATS:
        case = tmp_path / fmt
        case.mkdir()
        outcome, detail = fuzz.run_case(fmt, valid[fmt], dict(valid[fmt].files), case)
        assert outcome == "accepted and correct", (fmt, detail)
