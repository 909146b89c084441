"""qsparse_compiler: a torch.compile backend for video diffusion transformers (W4A8 + block-sparse attention).

Public API: ``calibrate`` (produce a Plan), ``optimize`` (compile a pipeline's transformer and drive its residual cache), ``load_plan``/``save_plan``,
the configs, and ``runtime`` (``ResidualCacheRuntime`` for bare models in a loop). The backend itself is reached with
``torch.compile(model, backend="quantsparse", options=...)``.
"""

from . import backend, runtime  # importing backend registers backend="quantsparse" with Dynamo
from .calibration import CalibrationConfig, calibrate
from .config import CacheConfig, QuantConfig, QuantSparseConfig, SparsityConfig
from .plan import load_plan, save_plan
from .runtime.pipeline import optimize, release_dense_weights, restore, runtime_of
from .runtime.residual_cache import ResidualCacheRuntime

__all__ = [
    "CalibrationConfig",
    "calibrate",
    "CacheConfig",
    "QuantConfig",
    "QuantSparseConfig",
    "SparsityConfig",
    "ResidualCacheRuntime",
    "load_plan",
    "optimize",
    "release_dense_weights",
    "restore",
    "runtime",
    "runtime_of",
    "save_plan",
]
__version__ = "0.1.0"
