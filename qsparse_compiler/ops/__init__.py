"""``qsparse::`` custom ops: schema, fake impl, plain-torch reference (CPU), CUDA dispatch to kernels/.

Importing this package registers the ops with torch.library.
"""

from . import sparse_attention_cuda  # noqa: F401  (registers the Triton kernel for CUDA tensors)
from . import w4a8_cuda  # noqa: F401  (registers the Triton kernels as the op's CUDA implementation)
from .ln_modulate_quant import layer_norm_modulate_quant, layer_norm_modulate_quant_reference
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from .residual_attention import residual_attention
from .sparse_attention import sparse_attention, sparse_attention_reference
from .video_layout import build_video_layout, video_block_layout
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
