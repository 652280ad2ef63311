"""surgery: insert widen/narrow pairs at block boundaries, train, fold them back exactly.

The WIN training stages are in `surgery.win`; the companion tools of papers 002/003 (factorize,
sparsity, bottlenecks, balancing, kernel distance) in `surgery.experiments`."""

from surgery.analysis.blocks import BlockTable, Boundary
from surgery.errors import CaptureError, CheckpointError, FoldError, PlanError, SurgeryError
from surgery.files.checkpoint import Checkpoint, load, open_checkpoint, save
from surgery.files.sources import Source
from surgery.files.stream import FoldSummary, fold_checkpoint
from surgery.paired import find_blocks, insert_pairs, plan_pairs
from surgery.plan import Plan
from surgery.runtime.attach import apply_plan
from surgery.runtime.fold import ShardedFold, fold, fold_sharded, fold_state_dict
from surgery.runtime.pairs import Pair, premerged, probe, set_premerged
from surgery.verify import VerifyReport, verify

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
