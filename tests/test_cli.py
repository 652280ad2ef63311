"""The `surgery` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys


def _surgery(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "surgery.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_runs_the_whole_pipeline():
    result = _surgery("demo", "--steps", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Block boundaries of ResNet" in out
    assert "inserted 7 pairs" in out and "trained 3 steps" in out
    assert "WIN probes" in out
    assert "CPUExecutionProvider" in out or "CUDAExecutionProvider" in out
    assert "same as the original" in out and "OK" in out


def test_bad_arguments_exit_2():
    result = _surgery("demo", "--steps", "many")
    assert result.returncode == 2 and "invalid int value" in result.stderr
    result = _surgery("demo", "--wide", "0.5")
    assert result.returncode == 2 and "wide must be >= 1" in result.stderr
