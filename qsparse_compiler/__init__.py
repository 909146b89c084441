"""qsparse_compiler: a torch.compile backend for video diffusion transformers (W4A8 + block-sparse attention)."""

from .config import QuantConfig, QuantSparseConfig, SparsityConfig

__all__ = ["QuantConfig", "QuantSparseConfig", "SparsityConfig"]
__version__ = "0.1.0"
