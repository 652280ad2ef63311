"""surgery: insert widen/narrow pairs at block boundaries, train, fold them back exactly."""

from .blocks import BlockTable, Boundary, find_blocks
from .checkpoint import Checkpoint, load, open_checkpoint, save
from .errors import CaptureError, CheckpointError, FoldError, PlanError, SurgeryError
from .fold import fold, fold_state_dict
from .paired import apply_plan, insert_pairs, plan_pairs
from .pairs import Pair, probe
from .plan import Plan
from .sources import Source
from .stream import FoldSummary, fold_checkpoint
from .verify import VerifyReport, verify

__all__ = [
    "BlockTable",
    "Boundary",
    "CaptureError",
    "Checkpoint",
    "CheckpointError",
    "FoldError",
    "FoldSummary",
    "Pair",
    "Plan",
    "PlanError",
    "Source",
    "SurgeryError",
    "VerifyReport",
    "apply_plan",
    "find_blocks",
    "fold",
    "fold_checkpoint",
    "fold_state_dict",
    "insert_pairs",
    "load",
    "open_checkpoint",
    "plan_pairs",
    "probe",
    "save",
    "verify",
]
