"""qsparse_compiler: a torch.compile backend for video diffusion transformers (W4A8 + block-sparse attention).

Public API: ``calibrate`` (produce a Plan), ``optimize`` (compile a pipeline's transformer and drive its residual cache), ``load_plan``/``save_plan``,
the configs, ``Session`` (what one compiled model owns at run time) and ``runtime`` (``ResidualCacheRuntime`` for
bare models in a loop). The backend itself is reached with
``torch.compile(model, backend="quantsparse", options=...)``, after ``use_compile_friendly_attention(model)`` for a
model whose attention processor breaks the graph (Mochi; ``optimize`` does it itself).
"""

from . import runtime
from .compiler import backend  # importing backend registers backend="quantsparse" with Dynamo
from .calibration import CalibrationConfig, calibrate
from .config import CacheConfig, QuantConfig, QuantSparseConfig, SparsityConfig
from .plan import load_plan, save_plan
from .runtime.attention_processors import restore_attention, use_compile_friendly_attention
from .runtime.pipeline import optimize, release_dense_weights, restore, runtime_of
from .runtime.residual_cache import ResidualCacheRuntime
from .runtime.session import Session

__all__ = [
    "CalibrationConfig",
    "calibrate",
    "CacheConfig",
    "QuantConfig",
    "QuantSparseConfig",
    "SparsityConfig",
    "ResidualCacheRuntime",
    "Session",
    "load_plan",
    "optimize",
    "release_dense_weights",
    "restore",
    "restore_attention",
    "runtime",
    "runtime_of",
    "save_plan",
    "use_compile_friendly_attention",
]
from ._version import __version__
