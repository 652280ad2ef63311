"""surgery: insert widen/narrow pairs at block boundaries, train, fold them back exactly."""

from .attach import apply_plan
from .balance import (
    BalanceReport,
    GradNorms,
    balanced_init,
    gradient_norms,
    scale_invariant,
    smooth_hinge_loss,
)
from .blocks import BlockTable, Boundary
from .bottleneck import BottleneckPlan, nonlinear_bottleneck
from .checkpoint import Checkpoint, load, open_checkpoint, save
from .errors import CaptureError, CheckpointError, FoldError, PlanError, SurgeryError
from .factorize import Factorized, FactorPlan, contract, contract_state_dict, factorize
from .fold import fold, fold_state_dict
from .kernel_distance import (
    KernelDistance,
    kernel_distance,
    kernel_distance_approx,
    optimal_connectivity,
)
from .paired import find_blocks, insert_pairs, plan_pairs
from .pairs import Pair, premerged, probe, set_premerged
from .plan import Plan
from .sources import Source
from .sparsity import (
    layer_proportional,
    load_masked,
    remove_masks,
    sparsify_wide,
    trainable_parameters,
)
from .stream import FoldSummary, fold_checkpoint
from .verify import VerifyReport, verify
from .widths import WidthTable, resize, width_groups

__all__ = [
    "BalanceReport",
    "BlockTable",
    "BottleneckPlan",
    "Boundary",
    "CaptureError",
    "Checkpoint",
    "CheckpointError",
    "FactorPlan",
    "Factorized",
    "FoldError",
    "FoldSummary",
    "GradNorms",
    "KernelDistance",
    "Pair",
    "Plan",
    "PlanError",
    "Source",
    "SurgeryError",
    "VerifyReport",
    "WidthTable",
    "apply_plan",
    "balanced_init",
    "contract",
    "contract_state_dict",
    "factorize",
    "find_blocks",
    "fold",
    "fold_checkpoint",
    "fold_state_dict",
    "gradient_norms",
    "insert_pairs",
    "kernel_distance",
    "kernel_distance_approx",
    "layer_proportional",
    "load",
    "load_masked",
    "nonlinear_bottleneck",
    "open_checkpoint",
    "optimal_connectivity",
    "plan_pairs",
    "premerged",
    "probe",
    "remove_masks",
    "resize",
    "save",
    "scale_invariant",
    "set_premerged",
    "smooth_hinge_loss",
    "sparsify_wide",
    "trainable_parameters",
    "verify",
    "width_groups",
]
