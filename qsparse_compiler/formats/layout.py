"""The one block-sparse layout type of the project (the shape of FlexAttention's BlockMask).

An attention of ``q_len`` queries over ``kv_len`` keys is cut into tiles of ``block_q`` x ``block_kv`` tokens;
a layout lists, for every (batch, head, query block), which key blocks are computed:

    kv_num_blocks  int32 [B, H, QB]         how many key blocks query block ``m`` visits
    kv_indices     int32 [B, H, QB, KVB]    their indices, ascending; entries past kv_num_blocks are padding
    QB = ceil(q_len / block_q), KVB = ceil(kv_len / block_kv); B and H may be 1 and then broadcast.

A query block with ``kv_num_blocks == 0`` (an *empty row*) attends to nothing: by definition its output is 0 and
its log-sum-exp is -inf. Tokens past ``q_len``/``kv_len`` in a tail block do not exist and are never attended.

Layouts combine tile by tile: ``a | b`` (union: a tile is computed if either computes it) and ``a & b``
(intersection); B and H broadcast like tensors. ``to_ascii()``/``show()`` draw a (batch, head) as text for debugging.
Constructing a layout validates it, which reads values back to the host: build layouts off the hot path (the
kernels take the raw ``kv_num_blocks``/``kv_indices`` tensors and never validate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockSparseLayout", "LayoutError", "num_blocks", "bitmap_to_blocks"]


class LayoutError(ValueError):
    """A layout's tensors disagree with each other or with the attention they are used for."""


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def bitmap_to_blocks(bitmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``bool [B, H, QB, KVB]`` tile map -> (kv_num_blocks int32 [B, H, QB], kv_indices int32 [B, H, QB, KVB]).

    Pure tensor code with no host synchronization, so it may run inside a compiled graph or a CUDA graph.
    """
    kv_num_blocks = bitmap.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not computed" puts the computed key blocks first, in ascending order.
    kv_indices = torch.argsort((~bitmap).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return kv_num_blocks.contiguous(), kv_indices.contiguous()


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
        kv_num_blocks, kv_indices = bitmap_to_blocks(bitmap)
        return cls(kv_num_blocks, kv_indices, block_q, block_kv, q_len, kv_len)

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
        # Padding slots scatter into an extra, discarded column: sending them to a real column (say 0) would race
        # with a listed block 0 (scatter_ with duplicate indices keeps an arbitrary one of the writes).
        dense = torch.zeros((b, h, qb, kvb + 1), dtype=torch.bool, device=self.kv_indices.device)
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

    # ---- combining layouts -------------------------------------------------------------------------------------

    def _combine(self, other: "BlockSparseLayout", op: str) -> "BlockSparseLayout":
        if not isinstance(other, BlockSparseLayout):
            return NotImplemented
        mine = (self.block_q, self.block_kv, self.q_len, self.kv_len)
        theirs = (other.block_q, other.block_kv, other.q_len, other.kv_len)
        if mine != theirs:
            raise LayoutError(
                f"qsparse_compiler.sparsity.BlockSparseLayout: cannot {op} layouts of different geometry "
                f"(block_q, block_kv, q_len, kv_len) {mine} vs {theirs}; rebuild one of them on the other's blocks"
            )
        a, b = self.to_dense(), other.to_dense().to(self.kv_indices.device)
        try:
            bitmap = (a | b) if op == "union" else (a & b)
        except RuntimeError as error:
            raise LayoutError(
                f"qsparse_compiler.sparsity.BlockSparseLayout: cannot {op} layouts with B, H {self.shape[:2]} and "
                f"{other.shape[:2]}; B and H must match or be 1"
            ) from error
        return BlockSparseLayout.from_bitmap(bitmap.contiguous(), self.block_q, self.block_kv, self.q_len, self.kv_len)

    def union(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        """Tiles computed by either layout (B and H broadcast)."""
        return self._combine(other, "union")

    def intersection(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        """Tiles computed by both layouts (B and H broadcast)."""
        return self._combine(other, "intersect")

    __or__ = union
    __and__ = intersection

    # ---- debugging views ---------------------------------------------------------------------------------------

    def to_ascii(self, batch: int = 0, head: int = 0, max_size: int = 64) -> str:
        """Draw the tile map of one (batch, head): rows are query blocks, columns key blocks.

        ``#`` computed, ``.`` skipped. Maps larger than ``max_size`` on a side are shrunk by pooling groups of tiles;
        a pooled cell shows ``#`` if all its tiles are computed, ``+`` if some are, ``.`` if none.
        """
        b, h, qb, kvb = self.shape
        if not (-b <= batch < b and -h <= head < h):
            raise IndexError(
                f"qsparse_compiler.sparsity.BlockSparseLayout.to_ascii: (batch={batch}, head={head}) is outside "
                f"B={b}, H={h}"
            )
        tiles = self.to_dense()[batch, head].cpu().float()
        row_step, col_step = num_blocks(qb, max_size), num_blocks(kvb, max_size)
        rows, cols = num_blocks(qb, row_step), num_blocks(kvb, col_step)
        # Pad to whole groups; padded tiles count as neither computed nor present (weight 0).
        padded = torch.zeros(rows * row_step, cols * col_step)
        present = torch.zeros_like(padded)
        padded[:qb, :kvb] = tiles
        present[:qb, :kvb] = 1.0
        share = padded.view(rows, row_step, cols, col_step).sum((1, 3))
        count = present.view(rows, row_step, cols, col_step).sum((1, 3))
        lines = [
            f"{self!r} [batch {batch}, head {head}; one character = {row_step}x{col_step} tiles]"
        ]
        for r in range(rows):
            line = []
            for c in range(cols):
                filled = share[r, c].item()
                line.append("#" if filled == count[r, c].item() and filled > 0 else ("+" if filled > 0 else "."))
            lines.append("".join(line))
        return "\n".join(lines)

    def show(self, batch: int = 0, head: int = 0, max_size: int = 64) -> None:
        """Print ``to_ascii`` (for a REPL or a debugger)."""
        print(self.to_ascii(batch, head, max_size))

    def plot(self, batch: int = 0, head: int = 0, ax=None):  # pragma: no cover - optional matplotlib view
        """Image of the tile map of one (batch, head) with matplotlib (imported only here); returns the axes."""
        import matplotlib.pyplot as plt

        ax = ax if ax is not None else plt.gca()
        ax.imshow(self.to_dense()[batch, head].cpu().numpy(), cmap="Greys", interpolation="nearest", aspect="auto")
        ax.set_xlabel(f"key block ({self.block_kv} tokens)")
        ax.set_ylabel(f"query block ({self.block_q} tokens)")
        ax.set_title(f"density {self.density():.3f}")
        return ax
