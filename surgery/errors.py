"""Errors that name the problem and the fix."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class of every error this package raises on purpose."""


class CaptureError(SurgeryError):
    """The model could not be turned into a dataflow graph."""


class PlanError(SurgeryError, ValueError):
    """The requested sites, widths or inputs do not fit the model."""


class FoldError(SurgeryError):
    """A fold recipe could not be applied exactly (refused, never approximated)."""


class CheckpointError(SurgeryError):
    """A checkpoint file is unreadable, inconsistent with its plan, or unsafe to load."""
