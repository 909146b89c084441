"""Block-sparse attention forward (Triton): online softmax over the key blocks a layout lists, and nothing else.

    block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, scale, key_padding_mask=None)
        -> out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) fp32 (natural log)

Inputs (the contract of ``qsparse::sparse_attention``):
    q (B, H, Sq, D), k and v (B, H, Skv, D): bf16 or fp16, any strides with the last dim contiguous; D in {16, 32,
        64, 128} (the project needs 64 and 128).
    kv_num_blocks int32 [B|1, H|1, QB]; kv_indices int32 [B|1, H|1, QB, KVB]: for query block m (``block_q`` tokens),
        the first ``kv_num_blocks[.., m]`` entries of ``kv_indices[.., m, :]`` are the key blocks (``block_kv``
        tokens) it attends to. B or H of size 1 broadcast; different heads may have different layouts, and all
        heads run in one launch (head fusion).
    key_padding_mask: optional bool (B|1, 1, 1, Skv), True = the key takes part.

Semantics: ``out`` equals softmax attention restricted to the listed tiles (and to unmasked keys); tokens past
Sq/Skv in tail blocks do not exist. A query row that attends to nothing (an empty layout row, as a skipped head
has, or every listed key masked) gets out = 0 and lse = -inf. Listing the same key block twice counts it twice:
layouts must not repeat indices (``BlockSparseLayout`` guarantees this).

How: one program per (query tile of BLOCK_M rows, batch x head). It loops over the listed key blocks only, each
split into LAYOUT_BLOCK_KV // BLOCK_N sub-tiles, keeps fp32 running max / sum / accumulator (FlashAttention-2's
online softmax), and works in the exp2 domain: scores are multiplied by ``scale * log2(e)`` once, so the softmax
uses the fast ``exp2`` and the log-sum-exp is converted back to natural log at the end. Consecutive programs are
query tiles of the same head, so a head's K and V stay in L2 while its tiles run.

Tuning: ``CONFIGS`` (a list of ``triton.Config``) and ``keep_config`` (the filter) are data; on CUDA the launcher
autotunes over them per (head dim, layout blocks, mask, dtype); pass ``config=`` to pin one (e.g. for CUDA-graph
capture before any autotuning has happened). Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` with the
first valid config.

No host synchronization happens in the launcher (no ``.item()``, no data-dependent shapes): it can be captured in
a CUDA graph and called from a ``torch.compile``d graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .rounding import round_to_bf16_grid

__all__ = ["block_sparse_attention", "unsupported_reason", "CONFIGS", "keep_config", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_LAYOUT_BLOCKS = (16, 32, 64, 128, 256)
_LOG2E = 1.4426950408889634


@triton.jit
def _block_sparse_attention_fwd(
    Q, K, V, Out, Lse, KvNum, KvIdx, Mask,
    K_desc, V_desc,  # TMA descriptors of K and V, block [1, 1, BLOCK_N, HEAD_DIM] (read only when USE_TMA)
    qk_scale_log2,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im,
    stride_mb, stride_mn,
    H, SEQ_Q, SEQ_KV,
    HEAD_DIM: tl.constexpr,
    LAYOUT_BLOCK_Q: tl.constexpr,
    LAYOUT_BLOCK_KV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EVEN_KV: tl.constexpr,  # SEQ_KV % BLOCK_N == 0: no key tile has a tail, skip the bounds bias
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,  # interpreter only: its bf16 tl.dot is wrong (Triton 3.9), fp32 is right
    WARP_SPECIALIZE: tl.constexpr = False,  # producer/consumer warps for the key loop where Triton supports it
    USE_TMA: tl.constexpr = False,  # K/V tiles through the tensor-memory accelerator (zero-filled past Skv)
    TAIL_BRANCH: tl.constexpr = False,  # mask key tails under a scalar branch (see the loop)
    LAZY_RESCALE: tl.constexpr = False,  # rescale acc only when a row max grew by > 2^8 (see the loop)
    TMA_OK: tl.constexpr = False,  # K_desc/V_desc are real descriptors (an autotune key: prunes TMA configs)
):
    tl.static_assert(TMA_OK or not USE_TMA, "USE_TMA needs TMA descriptors of K and V")
    tl.static_assert(LAYOUT_BLOCK_Q % BLOCK_M == 0, "a kernel query tile must lie inside one layout query block")
    tl.static_assert(LAYOUT_BLOCK_KV % BLOCK_N == 0, "a kernel key tile must lie inside one layout key block")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM >= 16, "tl.dot needs every dim >= 16")
    SUB: tl.constexpr = LAYOUT_BLOCK_KV // BLOCK_N

    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row = (pid_m * BLOCK_M) // LAYOUT_BLOCK_Q  # the layout's query block

    # Layout tensors broadcast over B/H through zero strides (set by the launcher).
    num_listed = tl.load(KvNum + b * stride_nb + h * stride_nh + row * stride_nm)
    idx_row = KvIdx + b * stride_ib + h * stride_ih + row * stride_im

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < SEQ_Q, other=0.0)
    if not USE_TMA:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for j in tl.range(0, num_listed * SUB, warp_specialize=WARP_SPECIALIZE):
        block = tl.load(idx_row + j // SUB)
        start_n = block * LAYOUT_BLOCK_KV + (j % SUB) * BLOCK_N
        cols = start_n + offs_n
        in_bounds = cols < SEQ_KV
        # K is read transposed ([D, BLOCK_N]) so the dot is a plain (M, D) x (D, N).
        if USE_TMA:
            k = tl.trans(K_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM))
        elif EVEN_KV:
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None])
        else:
            k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=in_bounds[None, :], other=0.0)
        if UPCAST_DOT:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32))
        else:
            qk = tl.dot(q, k)
        if HAS_MASK:
            attend = tl.load(Mask + b * stride_mb + cols * stride_mn, mask=in_bounds, other=0) != 0
            qk += tl.where(attend, 0.0, float("-inf"))[None, :]
        elif not EVEN_KV:
            if TAIL_BRANCH:
                # Only the sequence's last key block has a tail: branch on a scalar instead of adding a bias to
                # every score of every tile.
                if start_n + BLOCK_N > SEQ_KV:
                    qk += tl.where(in_bounds, 0.0, float("-inf"))[None, :]
            else:
                qk += tl.where(in_bounds, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)
        if LAZY_RESCALE:
            # FlashAttention-4's trick: keep the stale running max (and skip rescaling acc, a [BLOCK_M, D] multiply)
            # unless some row's max grew by more than 2^8; p = exp2(s - m_stale) <= 256 stays exact enough in
            # fp32/bf16, and acc and l share the stale max, so out = acc / l is unchanged.
            # Rows with m_i = -inf: growth is huge if they now see a key, -inf (no growth) if they still see none.
            growth = m_new - tl.maximum(m_i, -1.0e30)
            if tl.max(growth, 0) > 8.0:
                alpha = tl.math.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            m_sub = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.math.exp2(qk * qk_scale_log2 - m_sub[:, None])
            l_i = l_i + tl.sum(p, 1)
        else:
            # A row that has seen only masked keys keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk * qk_scale_log2 - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        if USE_TMA:
            v = V_desc.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif EVEN_KV:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=in_bounds[:, None], other=0.0)
        if UPCAST_DOT:
            if v.dtype == tl.bfloat16:
                p = round_to_bf16_grid(p)
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)

    attended = l_i > 0.0
    out = acc / tl.where(attended, l_i, 1.0)[:, None]  # empty rows: acc = 0, so out = 0
    if UPCAST_DOT:
        if Out.dtype.element_ty == tl.bfloat16:
            out = round_to_bf16_grid(out)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < SEQ_Q)
    lse = tl.where(attended, (m_i + tl.math.log2(tl.where(attended, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m, lse, mask=offs_m < SEQ_Q)


# ---- tuning data --------------------------------------------------------------------------------------------------


def _size_descriptors(nargs) -> None:
    """Autotune pre-hook: the TMA block is [1, 1, BLOCK_N, HEAD_DIM] of the config being run."""
    block = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]
    for name in ("K_desc", "V_desc"):
        if isinstance(nargs[name], TensorDescriptor):  # else TMA configs were pruned (unaligned tensors)
            nargs[name].block_shape = block


def _config(
    bm: int, bn: int, warps: int, stages: int, tma: bool = False, tail_branch: bool = False, lazy: bool = False
) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma, "TAIL_BRANCH": tail_branch, "LAZY_RESCALE": lazy},
        num_warps=warps,
        num_stages=stages,
        pre_hook=_size_descriptors,
    )


# Measured on the H100 (2026-11-25, torch 2.11, triton 3.6; 1x12x32,760x128, 128x128 layout blocks, random layout,
# ms at 15% / 100% density; benchmarks/results/sparse_attention_NOTES.md): TMA 128x64, 4 warps, 3 stages 1.96 / 12.8;
# 2 stages 2.00 / 12.8; 4 stages 2.02 / 13.2; TMA 128x128 8 warps 2.13 / 15.1; pointer loads 128x64 4 warps 2.26 /
# 15.5; 128x128 8 warps 2.25 / 16.1; 128x64 8 warps 2.47 / 18.6; 128x128 4 warps 5.3 / 36 (spills). TAIL_BRANCH
# (2.24 / 14.4) and LAZY_RESCALE (2.05 / 12.9) lost and stay out of the list (each candidate costs autotune time
# at the first call); warp specialization does not compile for this loop with 4 warps on Hopper (triton 3.6).
CONFIGS: list[triton.Config] = [
    _config(128, 64, 4, 3, tma=True),
    _config(128, 64, 4, 2, tma=True),
    _config(128, 128, 8, 2, tma=True),
    _config(128, 128, 4, 3, tma=True),  # D <= 64 only (keep_config): fits the registers there
    _config(128, 64, 4, 3),  # pointer loads: where TMA is impossible (unaligned tensors)
    _config(128, 128, 8, 3),
    _config(64, 64, 4, 3, tma=True),
    _config(64, 64, 4, 3),
    _config(64, 32, 4, 2),
    _config(32, 32, 4, 2),
    _config(16, 16, 4, 1),  # tiny layout blocks (tests, interpreter)
]


def _tma_ok(t: torch.Tensor) -> bool:
    """The TMA unit needs a 16-byte aligned base and 16-byte multiples for every stride but the last."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in t.stride()[:-1]) and t.stride(-1) == 1


def keep_config(config: triton.Config, head_dim: int, block_q: int, block_kv: int) -> bool:
    """A config fits when its tiles nest inside the layout's blocks; prefer the largest query tile that does
    (BLOCK_M=128 on 128-token blocks); 128x128 tiles with 4 warps only for D <= 64 (registers)."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if block_q % bm or block_kv % bn:
        return False
    if bm != min(block_q, 128):
        return False
    if bn == 128 and config.num_warps < 8 and head_dim > 64:  # 128x128 fp32 scores + acc spill with 4 warps
        return False
    return head_dim <= 128


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    kept = [c for c in configs if keep_config(c, args["HEAD_DIM"], args["LAYOUT_BLOCK_Q"], args["LAYOUT_BLOCK_KV"])]
    # TMA loads beat pointer loads in every measured config (see CONFIGS): tune among them when TMA is possible.
    with_tma = [c for c in kept if c.kwargs["USE_TMA"]]
    kept = with_tma if args["TMA_OK"] and with_tma else [c for c in kept if not c.kwargs["USE_TMA"]]
    return kept or [_config(16, 16, 4, 1)]


_autotuned = triton.autotune(
    configs=CONFIGS,
    key=["HEAD_DIM", "LAYOUT_BLOCK_Q", "LAYOUT_BLOCK_KV", "HAS_MASK", "EVEN_KV", "TMA_OK"],
    prune_configs_by={"early_config_prune": _prune},
)(_block_sparse_attention_fwd)


# ---- launcher -----------------------------------------------------------------------------------------------------


def unsupported_reason(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Optional[str]:
    """None if the kernel handles these inputs, else why not (shape/dtype checks only: no host sync)."""
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype q={q.dtype} k={k.dtype} v={v.dtype}: needs bf16 or fp16, all the same"
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}: need (B, H, S, D), same B, H, D"
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[3]} not in {SUPPORTED_HEAD_DIMS}"
    if block_q not in _SUPPORTED_LAYOUT_BLOCKS or block_kv not in _SUPPORTED_LAYOUT_BLOCKS:
        return f"layout blocks {block_q}x{block_kv}: each must be one of {_SUPPORTED_LAYOUT_BLOCKS}"
    b, h, sq, _ = q.shape
    qb, kvb = -(-sq // block_q), -(-k.shape[2] // block_kv)
    if kv_num_blocks.dtype != torch.int32 or kv_indices.dtype != torch.int32:
        return "kv_num_blocks and kv_indices must be int32"
    if (
        kv_num_blocks.ndim != 3
        or kv_indices.ndim != 4
        or kv_num_blocks.shape[0] not in (1, b)
        or kv_num_blocks.shape[1] not in (1, h)
        or kv_num_blocks.shape[2] != qb
        or kv_indices.shape[:3] != kv_num_blocks.shape
        or kv_indices.shape[3] != kvb
    ):
        return (
            f"layout kv_num_blocks {tuple(kv_num_blocks.shape)}, kv_indices {tuple(kv_indices.shape)} does not fit "
            f"B={b}, H={h}, QB={qb}, KVB={kvb}"
        )
    if key_padding_mask is not None:
        m = key_padding_mask
        if m.ndim != 4 or m.shape[0] not in (1, b) or m.shape[1:3] != (1, 1) or m.shape[3] != k.shape[2]:
            return f"key_padding_mask {tuple(m.shape)}: needs (B|1, 1, 1, Skv={k.shape[2]})"
        if m.dtype != torch.bool:
            return f"key_padding_mask dtype {m.dtype}: needs bool"
    devices = {t.device for t in (q, k, v, kv_num_blocks, kv_indices)}
    if len(devices) != 1:
        return f"tensors on different devices {devices}"
    return None


def _even_kv(seq_kv: int, block_n: int, layout_block_kv: int) -> bool:
    """No key tile the kernel visits reaches past the keys. A listed layout block is visited in BLOCK_N-wide tiles,
    so a tail layout block has tiles past seq_kv even when seq_kv is a multiple of BLOCK_N (both powers of two)."""
    return seq_kv % max(block_n, layout_block_kv) == 0


def _bcast_stride(t: torch.Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k/v restricted to the layout's tiles; returns (out, lse). See the module docstring.

    ``config``: pin a launch configuration ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` (optionally
    ``"WARP_SPECIALIZE"``, ``"USE_TMA"``, ``"TAIL_BRANCH"``, ``"LAZY_RESCALE"``) instead of
    autotuning (on CPU/interpreter a fixed valid config is always used).
    """
    reason = unsupported_reason(q, k, v, kv_num_blocks, kv_indices, block_q, block_kv, key_padding_mask)
    if reason is not None:
        raise ValueError(f"qsparse_compiler.kernels.block_sparse_attention: unsupported input: {reason}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # Only the head dim must be contiguous; other strides are passed through (no copy for (B, S, H, D) views).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv_num_blocks = kv_num_blocks if kv_num_blocks.stride(-1) == 1 else kv_num_blocks.contiguous()
    kv_indices = kv_indices if kv_indices.stride(-1) == 1 else kv_indices.contiguous()
    b, h, sq, d = q.shape
    skv = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if key_padding_mask is not None:
        mask = key_padding_mask.view(torch.uint8)  # same bytes; Triton loads bytes more portably than i1
        mask_args = (mask, _bcast_stride(mask, 0), mask.stride(3))
    else:
        mask_args = (kv_num_blocks, 0, 0)  # never read (HAS_MASK=False); any tensor fills the slot
    if config is None and not q.is_cuda:
        config = default_config(d, block_q, block_kv)
    # Host-side TMA descriptors (plain Python objects: no device work). Under autotuning the pre-hook resizes their
    # block to the config being run.
    bn = config["BLOCK_N"] if config is not None else 64
    tma_ok = _tma_ok(k) and _tma_ok(v)
    if tma_ok:
        k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, bn, d])
        v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, bn, d])
    else:  # the slots get plain tensors; TMA configs are pruned / refused
        if config is not None and config.get("USE_TMA"):
            raise ValueError(
                "qsparse_compiler.kernels.block_sparse_attention: config USE_TMA=True needs k and v with a 16-byte "
                f"aligned base and strides; got strides {k.stride()} / {v.stride()}: pass a config without USE_TMA"
            )
        k_desc, v_desc = k, v
    args = (
        q, k, v, out, lse, kv_num_blocks, kv_indices, mask_args[0],
        k_desc, v_desc,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        _bcast_stride(kv_num_blocks, 0), _bcast_stride(kv_num_blocks, 1), kv_num_blocks.stride(2),
        _bcast_stride(kv_indices, 0), _bcast_stride(kv_indices, 1), kv_indices.stride(2),
        mask_args[1], mask_args[2],
        h, sq, skv,
    )
    meta = dict(
        HEAD_DIM=d,
        LAYOUT_BLOCK_Q=block_q,
        LAYOUT_BLOCK_KV=block_kv,
        HAS_MASK=key_padding_mask is not None,
        TMA_OK=tma_ok,
    )

    def grid(m):
        return (triton.cdiv(sq, m["BLOCK_M"]), b * h)

    if config is None and q.is_cuda:
        # EVEN_KV must hold for every candidate BLOCK_N, and the autotuner picks BLOCK_N after it is fixed:
        # 128 is a multiple of every config's BLOCK_N.
        _autotuned[grid](*args, EVEN_KV=_even_kv(skv, 128, block_kv), **meta)
        return out, lse
    bm = config["BLOCK_M"]
    _block_sparse_attention_fwd[grid(config)](
        *args,
        EVEN_KV=_even_kv(skv, bn, block_kv),
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=config.get("num_warps", 4),
        num_stages=config.get("num_stages", 2),
        UPCAST_DOT=not q.is_cuda,
        WARP_SPECIALIZE=config.get("WARP_SPECIALIZE", False),
        USE_TMA=config.get("USE_TMA", False),
        TAIL_BRANCH=config.get("TAIL_BRANCH", False),
        LAZY_RESCALE=config.get("LAZY_RESCALE", False),
        **meta,
    )
    return out, lse


def default_config(head_dim: int, block_q: int, block_kv: int) -> dict:
    """The first config of ``CONFIGS`` that ``keep_config`` accepts (used where autotuning is not wanted)."""
    for c in CONFIGS:
        if keep_config(c, head_dim, block_q, block_kv):
            return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
