"""Moved (CHANGELOG.md, 0.2.0): the block layout type and the static patterns to ``qsparse_compiler.formats``
(``formats.layout``, ``formats.patterns``), the dynamic top-k layouts to ``qsparse_compiler.ops.dynamic_layout``.
This package re-exports their names under the old path until 0.3.0."""

import warnings

from ..formats.layout import BlockSparseLayout, LayoutError, bitmap_to_blocks, num_blocks
from ..formats.patterns import TokenGrid, diagonal_tiles, local_3d, multi_diagonal, random_blocks, skip, vertical_stripe
from ..ops.dynamic_layout import block_scores_reference, dynamic_topk_blocks, dynamic_topk_layout, estimate_block_scores

warnings.warn("qsparse_compiler.sparsity moved to qsparse_compiler.formats (layout, patterns) and "
              "qsparse_compiler.ops.dynamic_layout; import from there (the old path goes away in 0.3.0)",
              DeprecationWarning, stacklevel=2)

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
