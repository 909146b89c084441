"""The complement of a block-sparse layout: the tiles of dense attention that the layout skips.

A refresh step of the residual cache needs dense attention while the sparse output of the same step already covers
the layout's tiles. Attention over the complement tiles, merged with the sparse result through the two lse
(kernels/attention_merge.py), is exactly dense attention and costs (1 - density) of it: a refresh never pays more
than one dense attention (issue #16). ``complement_blocks`` builds that layout on the device with no host
synchronization, so it can run inside a compiled graph or a CUDA graph every refresh (dynamic layouts change).
"""

from __future__ import annotations

import torch

from .layout import bitmap_to_blocks

__all__ = ["complement_blocks"]


def complement_blocks(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices) of a layout -> the same tensors of its complement (same shape, B/H broadcast kept):
    every key block of a query block row that the layout does not list, ascending. A full row becomes an empty one
    (out 0, lse -inf in the kernels: the merge then keeps the sparse result alone)."""
    kvb = kv_indices.shape[-1]
    listed = torch.arange(kvb, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
    # Padding slots go to an extra, discarded column (sending them to a real one would race with a listed block).
    index = torch.where(listed, kv_indices.long(), kvb)
    bitmap = torch.zeros(kv_indices.shape[:-1] + (kvb + 1,), dtype=torch.bool, device=kv_indices.device)
    bitmap.scatter_(-1, index, True)
    return bitmap_to_blocks(~bitmap[..., :kvb])
