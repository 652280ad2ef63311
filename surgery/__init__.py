"""surgery: insert widen/narrow pairs at block boundaries, train, fold them back exactly."""

from .blocks import BlockTable, Boundary, find_blocks
from .errors import CaptureError, FoldError, PlanError, SurgeryError
from .fold import fold, fold_state_dict
from .paired import apply_plan, insert_pairs, plan_pairs
from .pairs import Pair, probe
from .plan import Plan
from .verify import VerifyReport, verify

__all__ = [
    "BlockTable",
    "Boundary",
    "CaptureError",
    "FoldError",
    "Pair",
    "Plan",
    "PlanError",
    "SurgeryError",
    "VerifyReport",
    "find_blocks",
    "fold",
    "fold_state_dict",
    "apply_plan",
    "insert_pairs",
    "plan_pairs",
    "probe",
    "verify",
]
