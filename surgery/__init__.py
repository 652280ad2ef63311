"""surgery: insert widen/narrow pairs at block boundaries, train, fold them back exactly.

The WIN training stages are in `surgery.win`; the companion tools of papers 002/003 (factorize,
sparsity, bottlenecks, balancing, kernel distance) in `surgery.experiments`."""

from . import widths as widths  # width groups and resize (surgery.widths), used by win.widen
from .attach import apply_plan
from .blocks import BlockTable, Boundary
from .checkpoint import Checkpoint, load, open_checkpoint, save
from .errors import CaptureError, CheckpointError, FoldError, PlanError, SurgeryError
from .fold import ShardedFold, fold, fold_sharded, fold_state_dict
from .paired import find_blocks, insert_pairs, plan_pairs
from .pairs import Pair, premerged, probe, set_premerged
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
    "ShardedFold",
    "SurgeryError",
    "VerifyReport",
    "apply_plan",
    "find_blocks",
    "fold",
    "fold_checkpoint",
    "fold_sharded",
    "fold_state_dict",
    "insert_pairs",
    "load",
    "open_checkpoint",
    "plan_pairs",
    "premerged",
    "probe",
    "save",
    "set_premerged",
    "verify",
]
