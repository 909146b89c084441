"""``qsparse::`` custom ops: per op file its schema, fake impl and plain-torch reference (the op's body, serving
CPU and any device without a kernel); per ``*_cuda.py`` file the CUDA kernels, registered one way,
``@op.register_kernel("cuda")``, falling back to the reference for what they do not cover.

Importing this package registers the ops and their CUDA kernels with torch.library.
"""

from . import residual_attention_cuda  # noqa: F401  (registers the op's CUDA kernel)
from . import sparse_attention_cuda  # noqa: F401  (registers the op's CUDA kernel)
from . import w4a8_cuda  # noqa: F401  (registers the ops' CUDA kernels)
from .ln_modulate_quant import layer_norm_modulate_quant, layer_norm_modulate_quant_reference
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from .residual_attention import residual_attention
from .sparse_attention import sparse_attention, sparse_attention_reference
from ..formats.pattern_spec import build_video_layout
from .video_layout import video_block_layout
from .w4a8_linear import w4a8_linear, w4a8_linear_reference

__all__ = [
    "layer_norm_modulate_quant",
    "layer_norm_modulate_quant_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "residual_attention",
    "sparse_attention",
    "sparse_attention_reference",
    "video_block_layout",
    "build_video_layout",
    "w4a8_linear",
    "w4a8_linear_reference",
]
