"""Block-sparse attention layouts and the patterns that fill them.

- ``layout``: ``BlockSparseLayout`` (the one layout type: kv_num_blocks [B, H, QB], kv_indices [B, H, QB, KVB]),
  union/intersection, ASCII view, ``bitmap_to_blocks`` (sync-free bitmap -> layout tensors).
- ``patterns``: static patterns over the 3D video token grid (diagonal ``local_3d``, ``multi_diagonal``,
  ``vertical_stripe``, ``skip``; ``random_blocks`` for tests and benchmarks).
- ``dynamic``: per-head top-k layouts from pooled q.k^T block scores, built on the device every step.
"""

from .dynamic import block_scores_reference, dynamic_topk_blocks, dynamic_topk_layout, estimate_block_scores
from .layout import BlockSparseLayout, LayoutError, bitmap_to_blocks, num_blocks
from .patterns import TokenGrid, diagonal_tiles, local_3d, multi_diagonal, random_blocks, skip, vertical_stripe

__all__ = [
    "BlockSparseLayout",
    "LayoutError",
    "bitmap_to_blocks",
    "num_blocks",
    "TokenGrid",
    "diagonal_tiles",
    "local_3d",
    "multi_diagonal",
    "random_blocks",
    "skip",
    "vertical_stripe",
    "block_scores_reference",
    "dynamic_topk_blocks",
    "dynamic_topk_layout",
    "estimate_block_scores",
]
