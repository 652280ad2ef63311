"""The companion tools of papers 002/003, apart from the WIN pipeline: low-rank factorization and
contraction, static sparsity of a widened model, non-linear bottlenecks, gradient-norm balancing,
and the kernel distance between networks. Each is used by a benchmark in `bench/`."""

from .balance import (
    BalanceReport,
    GradNorms,
    balanced_init,
    gradient_norms,
    scale_invariant,
    smooth_hinge_loss,
)
from .bottleneck import BottleneckPlan, nonlinear_bottleneck
from .factorize import Factorized, FactorPlan, contract, contract_state_dict, factorize
from .kernel_distance import (
    KernelDistance,
    kernel_distance,
    kernel_distance_approx,
    optimal_connectivity,
)
from .sparsity import (
    layer_proportional,
    load_masked,
    remove_masks,
    sparsify_wide,
    trainable_parameters,
)

__all__ = [
    "BalanceReport",
    "BottleneckPlan",
    "FactorPlan",
    "Factorized",
    "GradNorms",
    "KernelDistance",
    "balanced_init",
    "contract",
    "contract_state_dict",
    "factorize",
    "gradient_norms",
    "kernel_distance",
    "kernel_distance_approx",
    "layer_proportional",
    "load_masked",
    "nonlinear_bottleneck",
    "optimal_connectivity",
    "remove_masks",
    "scale_invariant",
    "smooth_hinge_loss",
    "sparsify_wide",
    "trainable_parameters",
]
