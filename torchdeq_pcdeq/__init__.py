"""torchdeq_pcdeq: positive concave deep equilibrium models (pcDEQ) for TorchDEQ.

Importing the package registers into TorchDEQ the core ``"pcdeq"``, the solver
``"pcdeq_fixed_point"`` and the norm ``"pcdeq_nonneg"`` (idempotently).

Example:
    >>> import torch, torchdeq
    >>> import torchdeq_pcdeq
    >>> from torchdeq_pcdeq import PcDEQConv2d
    >>> f = PcDEQConv2d(8, activation="tanh")
    >>> deq = torchdeq.get_deq(core="pcdeq")
    >>> x = f.inject(torch.randn(2, 8, 6, 6))
    >>> z_out, info = deq(lambda z: f(z, x), torch.zeros_like(x))
    >>> bool(info["converged"].all()) and bool((z_out[-1] > 0).all())
    True
"""

from .activations import (
    Activation,
    available_activations,
    get_activation,
    register_activation,
    unregister_activation,
)
from .certify import RateCertificate, rate_bound, rate_certificate
from .config import add_pcdeq_args
from .constraints import (
    NONNEGATIVITY_MODES,
    NonNegative,
    NonNegativeWeightNorm,
    PcDEQNonnegNorm,
    attach_projection,
    constrain_nonnegative,
    project_nonnegative_,
    reference_init_,
)
from .core import PcDEQCore
from .errors import (
    ActivationCheckError,
    ConvergenceError,
    InvalidInputError,
    NegativeWeightError,
    NonFiniteError,
    NonUniqueFixedPointError,
    NotPositiveMonotoneError,
    PcDEQError,
    PcDEQWarning,
    PreconditionError,
    UnknownNameError,
)
from .layers import PcDEQConv2d, PcDEQLayer, PcDEQLinear, observe_layer_calls
from .plugin import register
from .solver import pcdeq_fixed_point

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "register",
    # layers and activations
    "PcDEQLayer",
    "PcDEQLinear",
    "PcDEQConv2d",
    "Activation",
    "register_activation",
    "unregister_activation",
    "get_activation",
    "available_activations",
    # nonnegativity
    "NONNEGATIVITY_MODES",
    "NonNegative",
    "NonNegativeWeightNorm",
    "PcDEQNonnegNorm",
    "constrain_nonnegative",
    "attach_projection",
    "project_nonnegative_",
    "reference_init_",
    "observe_layer_calls",
    # solving and certifying
    "pcdeq_fixed_point",
    "rate_bound",
    "rate_certificate",
    "RateCertificate",
    "PcDEQCore",
    "add_pcdeq_args",
    # errors
    "PcDEQError",
    "PcDEQWarning",
    "UnknownNameError",
    "InvalidInputError",
    "ActivationCheckError",
    "NegativeWeightError",
    "PreconditionError",
    "NotPositiveMonotoneError",
    "NonUniqueFixedPointError",
    "ConvergenceError",
    "NonFiniteError",
]

register()
