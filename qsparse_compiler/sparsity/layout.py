"""The one block-sparse layout type of the project (the shape of FlexAttention's BlockMask).

An attention of ``q_len`` queries over ``kv_len`` keys is cut into tiles of ``block_q`` x ``block_kv`` tokens;
a layout lists, for every (batch, head, query block), which key blocks are computed:

    kv_num_blocks  int32 [B, H, QB]         how many key blocks query block ``m`` visits
    kv_indices     int32 [B, H, QB, KVB]    their indices, ascending; entries past kv_num_blocks are padding
    QB = ceil(q_len / block_q), KVB = ceil(kv_len / block_kv); B and H may be 1 and then broadcast.

A query block with ``kv_num_blocks == 0`` (an *empty row*) attends to nothing: by definition its output is 0 and
its log-sum-exp is -inf. Tokens past ``q_len``/``kv_len`` in a tail block do not exist and are never attended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockSparseLayout", "LayoutError", "num_blocks"]


class LayoutError(ValueError):
    """A layout's tensors disagree with each other or with the attention they are used for."""


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


@dataclass(frozen=True)
class BlockSparseLayout:
    kv_num_blocks: torch.Tensor  # [B, H, QB] int32
    kv_indices: torch.Tensor  # [B, H, QB, KVB] int32
    block_q: int
    block_kv: int
    q_len: int
    kv_len: int

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_bitmap(cls, bitmap: torch.Tensor, block_q: int, block_kv: int, q_len: int, kv_len: int) -> "BlockSparseLayout":
        """Build from a boolean tile map ``bitmap[B, H, QB, KVB]`` (True = computed)."""
        if bitmap.dtype != torch.bool or bitmap.ndim != 4:
            raise LayoutError(
                f"qsparse_compiler.sparsity: bitmap must be bool [B, H, QB, KVB], got {bitmap.dtype} {tuple(bitmap.shape)}"
            )
        kv_num_blocks = bitmap.sum(dim=-1, dtype=torch.int32)
        # A stable sort of "not computed" puts the computed key blocks first, in ascending order.
        kv_indices = torch.argsort((~bitmap).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return cls(kv_num_blocks.contiguous(), kv_indices.contiguous(), block_q, block_kv, q_len, kv_len)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, QB, KVB)."""
        return tuple(self.kv_indices.shape)  # type: ignore[return-value]

    def validate(self) -> None:
        qb, kvb = num_blocks(self.q_len, self.block_q), num_blocks(self.kv_len, self.block_kv)
        where = "qsparse_compiler.sparsity.BlockSparseLayout"
        if self.kv_num_blocks.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise LayoutError(f"{where}: kv_num_blocks and kv_indices must be int32")
        if self.kv_num_blocks.ndim != 3 or self.kv_indices.ndim != 4:
            raise LayoutError(
                f"{where}: kv_num_blocks must be [B, H, QB] and kv_indices [B, H, QB, KVB]; got "
                f"{tuple(self.kv_num_blocks.shape)} and {tuple(self.kv_indices.shape)}"
            )
        if self.kv_indices.shape[:3] != self.kv_num_blocks.shape or self.kv_indices.shape[2] != qb:
            raise LayoutError(
                f"{where}: for q_len={self.q_len}, block_q={self.block_q} expected QB={qb}; got kv_num_blocks "
                f"{tuple(self.kv_num_blocks.shape)}, kv_indices {tuple(self.kv_indices.shape)}"
            )
        if self.kv_indices.shape[3] != kvb:
            raise LayoutError(
                f"{where}: for kv_len={self.kv_len}, block_kv={self.block_kv} expected KVB={kvb} index slots; "
                f"got {self.kv_indices.shape[3]}"
            )
        if bool((self.kv_num_blocks < 0).any()) or bool((self.kv_num_blocks > kvb).any()):
            raise LayoutError(f"{where}: kv_num_blocks must lie in [0, {kvb}]")
        valid = self._valid_slots()
        listed = self.kv_indices[valid]
        if listed.numel() and (bool((listed < 0).any()) or bool((listed >= kvb).any())):
            raise LayoutError(f"{where}: kv_indices must lie in [0, {kvb}) where listed")

    def _valid_slots(self) -> torch.Tensor:
        slots = torch.arange(self.kv_indices.shape[-1], device=self.kv_indices.device)
        return slots < self.kv_num_blocks.unsqueeze(-1)

    def to_dense(self) -> torch.Tensor:
        """bool [B, H, QB, KVB]: True where a tile is computed."""
        b, h, qb, kvb = self.shape
        # Padding slots scatter into a spare last column, which is then dropped.
        dense = torch.zeros(b, h, qb, kvb + 1, dtype=torch.bool, device=self.kv_indices.device)
        index = torch.where(self._valid_slots(), self.kv_indices.long(), kvb)
        dense.scatter_(-1, index, True)
        return dense[..., :kvb]

    def to_token_mask(self) -> torch.Tensor:
        """bool [B, H, q_len, kv_len]: the equivalent dense attention mask (for tests and references)."""
        dense = self.to_dense()
        rows = dense.repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        return rows.repeat_interleave(self.block_kv, dim=3)[:, :, :, : self.kv_len]

    def density(self) -> float:
        """Fraction of (query block, key block) tiles computed, over all batches and heads."""
        total = self.kv_num_blocks.numel() * self.kv_indices.shape[-1]
        return float(self.kv_num_blocks.sum().item()) / max(total, 1)

    def __repr__(self) -> str:
        b, h, qb, kvb = self.shape
        counts = self.kv_num_blocks.float()
        return (
            f"BlockSparseLayout(B={b}, H={h}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"blocks={self.block_q}x{self.block_kv}, tiles={qb}x{kvb}, density={self.density():.3f}, "
            f"kv blocks per row min/mean/max={int(counts.min())}/{counts.mean():.1f}/{int(counts.max())})"
        )
