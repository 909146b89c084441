"""8-bit attention forward (Triton): int8 Q.K^T, e4m3 P.V, fp32 online softmax; block-sparse and dense entry points.

    block_sparse_attention_int8_fp8(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, kv_num_blocks,
                                    kv_indices, block_q, block_kv, scale, key_padding_mask=None, quant_block=64,
                                    out_dtype=torch.bfloat16) -> out (B, H, Sq, D) out_dtype, lse (B, H, Sq) fp32
    dense_attention_int8_fp8(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, scale,
                             key_padding_mask=None, quant_block=64, out_dtype=torch.bfloat16) -> (out, lse)

Inputs are the output of ``ops.attention_quantization.quantize_attention_inputs`` (the recipe and its plain-torch
reference live there): q_codes (B, H, Sq, D) int8 with one fp32 scale per (batch, head, ``quant_block`` tokens);
k_codes (B, H, Skv, D) int8 of the mean-smoothed keys, scales likewise; v_codes (B, H, D, Skv) float8_e4m3fn,
channel-major, with one fp32 scale per (batch, head, channel); lse_shift (B, H, Sq) fp32 = q . mean(k). All with a
unit stride in the last dim. Speed needs every row stride divisible by 16 bytes and V's tail tiles unmasked:
compiled Triton proves alignment only from arguments divisible by 16 and otherwise loads a tile byte by byte,
unpipelined (V's rows are Skv bytes: 32,760 at Wan 480p). ``quantize_attention_inputs`` pads V's rows with zero
codes to 128 tokens, and where a row has that room (``v_padded``) its tail tile loads unmasked. D in {32, 64, 128}.
The sparse entry point takes the layout contract of ``qsparse::sparse_attention``
(kernels/block_sparse_attention.py): ``kv_num_blocks`` [B|1, H|1, QB], ``kv_indices`` [B|1, H|1, QB, KVB] (per-head
layouts, all heads in one launch), layout blocks of 32..256 tokens, an optional bool
key-padding mask (B|1, 1, 1, Skv), tails. Rows that attend to nothing: out = 0, lse = -inf.

Numerics: the int8 dot is exact in int32 and converted to fp32 exactly (``MAGIC_I2F``: an integer add that folds
into the MMA's accumulator and an fp32 subtract, instead of a conversion instruction); scores are dequantized in
fp32, s = dot * k_scale * scale * log2(e) * q_scale, so the softmax runs in the exp2 domain. The row's Q scale (> 0,
as ``quantize_attention_inputs`` makes it) is applied last: the running max is q_scale * max_j(u_j) of u = dot *
k_scale * scale * log2(e) (exact: rounding is monotonic) and the exponent is one fused multiply-add, u * q_scale -
m. The tile's p = exp2(s - m) in [0, 1] is scaled by 448 and rounded to e4m3 (``P_SCALE``); the scaling is folded
into the exponent, 448 p = exp2(s - m + log2 448), and the row sum l accumulates that fp32 448 p (448 times the fp32
sum of p, up to fp32 rounding). Each key tile's P.V product is a fresh fp8 dot whose fp32 result is added to the
running accumulator: Hopper's fp8 MMA keeps fewer accumulator bits than fp32 (SageAttention2 and DeepGEMM promote
the same way), and a sum carried through thousands of keys in the MMA would lose them. At the end out = acc *
v_scale / l and lse = (m + log2 l - log2 448) * ln 2 + scale * lse_shift (the smoothing's shift: lse keeps
``qsparse::sparse_attention``'s meaning, so partial results merge through it). Tokens past Sq/Skv in tail tiles read
as zero codes and are masked with -inf; the dense kernel runs its full key tiles without bounds and the tail tile
once after them.

One jit function, ``_attend_key_tile``, is the inner loop of both kernels (one key tile: load, int8 dot, mask, online
softmax update, e4m3 P, fp8 dot); the sparse kernel walks the listed key blocks, the dense kernel every key tile.
Grid: (query tiles, batch x head); consecutive programs are query tiles of one head (K/V stay in L2).

Tuning: ``CONFIGS`` (a list of ``triton.Config``) and ``keep_config`` are data; on CUDA the launchers autotune over
them; ``config=`` pins one. Under ``TRITON_INTERPRET=1`` (no CUDA) the first valid config runs, P is rounded onto
the e4m3 grid before the cast (the interpreter truncates fp32 -> fp8 casts; ``rounding.round_to_e4m3_grid``) and the
fp8 dot runs on fp32 copies of its (exactly representable) operands. No host synchronization: graph-capturable.

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import round_to_bf16_grid, round_to_e4m3_grid

__all__ = [
    "block_sparse_attention_int8_fp8",
    "dense_attention_int8_fp8",
    "unsupported_reason",
    "CONFIGS",
    "keep_config",
    "SUPPORTED_HEAD_DIMS",
    "P_SCALE",
]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_SUPPORTED_LAYOUT_BLOCKS = (32, 64, 128, 256)  # the fp8 dot needs >= 32 keys per tile
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634
P_SCALE = 448.0  # ops/attention_quantization.P_SCALE: p in [0, 1] onto e4m3's whole range
_P_SCALE_JIT = tl.constexpr(P_SCALE)  # compiled kernels read only constexpr globals (the interpreter reads any)
_LOG2_P_SCALE_JIT = tl.constexpr(math.log2(P_SCALE))
_MAGIC_I2F_FLOAT = tl.constexpr(12582912.0)  # 1.5 * 2**23
_MAGIC_I2F_BITS = tl.constexpr(0x4B400000)  # its fp32 bit pattern


@triton.jit
def _attend_key_tile(
    acc, m_i, l_i, q, q_scale,
    k_base, v_base, k_scale_base, mask_base,
    start_n, offs_n, offs_d,
    stride_kn, stride_vd, stride_mn,
    SEQ_KV, qk_scale_log2,
    QUANT_BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_TAIL: tl.constexpr,  # this tile may reach past SEQ_KV: masked loads and -inf scores there
    V_PADDED: tl.constexpr,
    MAGIC_I2F: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """One key tile of the online softmax: returns the updated (acc, m_i, l_i). m_i is in log2 units; l_i and p are
    448 times those of exp2 (P_SCALE folded into the exponent, see the module docstring)."""
    cols = start_n + offs_n
    in_bounds = cols < SEQ_KV
    # K codes read transposed ([D, BLOCK_N]; D contiguous in memory = K-major for the MMA); V^T codes [D, BLOCK_N].
    if MASK_TAIL:
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=in_bounds[None, :], other=0)
        if V_PADDED:  # zero codes up to the next 128 tokens: an unmasked load stays vectorized (see _v_padded)
            v = tl.load(v_base + offs_d[:, None] * stride_vd + cols[None, :])
        else:
            v = tl.load(v_base + offs_d[:, None] * stride_vd + cols[None, :], mask=in_bounds[None, :], other=0.0)
        k_scale = tl.load(k_scale_base + cols // QUANT_BLOCK, mask=in_bounds, other=0.0)
    else:
        k = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None])
        v = tl.load(v_base + offs_d[:, None] * stride_vd + cols[None, :])
        k_scale = tl.load(k_scale_base + cols // QUANT_BLOCK)
    # u = scores / q_scale (log2 units): the row's Q scale (> 0) stays out of the [BLOCK_M, BLOCK_N] products and
    # enters once per score in the exponent's fused multiply-add below; a mask enters as the column's additive bias.
    k_factor = k_scale * qk_scale_log2
    dot = tl.dot(q, k, out_dtype=tl.int32)
    if MAGIC_I2F:
        # int32 -> fp32 without a conversion instruction (sm_90 converts at the rate of exp2, which the softmax
        # already saturates; not yet measured): |dot| <= D * 128 * 128 <= 2**21 (D <= 128), so the integer sum
        # dot + bits(1.5 * 2**23) is the bit pattern of the fp32 1.5 * 2**23 + dot (unit spacing there), and
        # subtracting 1.5 * 2**23 in fp32 is exact. One integer and one fp32 add.
        dot_f = (dot + _MAGIC_I2F_BITS).to(tl.float32, bitcast=True) - _MAGIC_I2F_FLOAT
    else:
        dot_f = dot.to(tl.float32)
    u = dot_f * k_factor[None, :]
    if HAS_MASK:
        attend = tl.load(mask_base + cols * stride_mn, mask=in_bounds, other=0) != 0
        u += tl.where(attend, 0.0, float("-inf"))[None, :]
    elif MASK_TAIL:
        u += tl.where(in_bounds, 0.0, float("-inf"))[None, :]
    # q_scale > 0 and rounding is monotonic, so max_j(q u_j) = q max_j(u_j) exactly.
    m_new = tl.maximum(m_i, tl.max(u, 1) * q_scale)
    # A row that has seen only masked keys keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    # 448 p = exp2(s - m + log2 448): P_SCALE folded into the subtrahend, one fused multiply-add per score.
    p_scaled = tl.math.exp2(u * q_scale[:, None] - (m_sub - _LOG2_P_SCALE_JIT)[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p_scaled, 1)
    if INTERPRETED:
        p_codes = round_to_e4m3_grid(p_scaled).to(tl.float8e4nv)
        pv = tl.dot(p_codes.to(tl.float32), tl.trans(v.to(tl.float32)))
    else:
        pv = tl.dot(p_scaled.to(tl.float8e4nv), tl.trans(v))
    acc = acc * alpha[:, None] + pv  # fresh fp8 dot per tile, accumulated in fp32 (see the module docstring)
    return acc, m_new, l_i


@triton.jit
def _finish(acc, m_i, l_i, lse_shift, v_scale, Out, Lse, o_ptrs, lse_ptrs, row_ok, qk_scale, INTERPRETED: tl.constexpr):
    """out = acc * v_scale / l (l = 448 sum p; 0 for rows that attended nothing), lse in natural log with the
    shift."""
    attended = l_i > 0.0
    denom = tl.where(attended, l_i, 1.0)
    out = acc * (v_scale[None, :] / denom[:, None])
    if INTERPRETED:
        if Out.dtype.element_ty == tl.bfloat16:
            out = round_to_bf16_grid(out)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(denom) - _LOG2_P_SCALE_JIT) * 0.6931471805599453 + qk_scale * lse_shift
    tl.store(lse_ptrs, tl.where(attended, lse, float("-inf")), mask=row_ok)


@triton.jit
def _attention_int8_fp8_fwd(
    Q, QScale, K, KScale, V, VScale, LseShift, Out, Lse, KvNum, KvIdx, Mask,
    qk_scale,  # the softmax scale
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vd,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im,
    stride_mb, stride_mn,
    H, SEQ_Q, SEQ_KV, Q_TILES, K_TILES,  # Q_TILES / K_TILES: scale tiles per (batch, head)
    HEAD_DIM: tl.constexpr,
    QUANT_BLOCK: tl.constexpr,
    SPARSE: tl.constexpr,  # False: every key tile (the dense entry point); the layout arguments are unused
    LAYOUT_BLOCK_Q: tl.constexpr,
    LAYOUT_BLOCK_KV: tl.constexpr,
    HAS_MASK: tl.constexpr,
    EVEN_KV: tl.constexpr,  # no key tile the kernel visits reaches past SEQ_KV
    V_PADDED: tl.constexpr,  # V rows hold zero codes up to the next multiple of 128 tokens (_v_padded)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAGIC_I2F: tl.constexpr = True,  # the scores' int32 -> fp32 by integer add + fp32 subtract (_attend_key_tile)
    INTERPRETED: tl.constexpr = False,
):
    tl.static_assert(LAYOUT_BLOCK_Q % BLOCK_M == 0, "a kernel query tile must lie inside one layout query block")
    tl.static_assert(LAYOUT_BLOCK_KV % BLOCK_N == 0, "a kernel key tile must lie inside one layout key block")
    tl.static_assert(BLOCK_N >= 32 and BLOCK_M >= 16 and HEAD_DIM >= 32, "int8 / fp8 tl.dot need K >= 32")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    bh = b.to(tl.int64) * H + h  # index of the (batch, head) in the contiguous scale tensors
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < SEQ_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0)
    q_scale = tl.load(QScale + bh * Q_TILES + offs_m // QUANT_BLOCK, mask=row_ok, other=1.0)
    qk_scale_log2 = qk_scale * 1.4426950408889634
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    k_scale_base = KScale + bh * K_TILES
    mask_base = Mask + b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 448 exp2(s - m_i), fp32
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if SPARSE:
        SUB: tl.constexpr = LAYOUT_BLOCK_KV // BLOCK_N
        row = (pid_m * BLOCK_M) // LAYOUT_BLOCK_Q
        num_listed = tl.load(KvNum + b * stride_nb + h * stride_nh + row * stride_nm)
        idx_row = KvIdx + b * stride_ib + h * stride_ih + row * stride_im
        for j in tl.range(0, num_listed * SUB):
            start_n = tl.load(idx_row + j // SUB) * LAYOUT_BLOCK_KV + (j % SUB) * BLOCK_N
            acc, m_i, l_i = _attend_key_tile(
                acc, m_i, l_i, q, q_scale, k_base, v_base, k_scale_base, mask_base, start_n, offs_n, offs_d,
                stride_kn, stride_vd, stride_mn, SEQ_KV, qk_scale_log2, QUANT_BLOCK, HAS_MASK, not EVEN_KV, V_PADDED,
                MAGIC_I2F, INTERPRETED)
    else:
        # Full key tiles need no bounds: the loop runs them unmasked and the tail tile, if any, runs once after it.
        full_end = (SEQ_KV // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_key_tile(
                acc, m_i, l_i, q, q_scale, k_base, v_base, k_scale_base, mask_base, start_n, offs_n, offs_d,
                stride_kn, stride_vd, stride_mn, SEQ_KV, qk_scale_log2, QUANT_BLOCK, HAS_MASK, False, V_PADDED,
                MAGIC_I2F, INTERPRETED)
        if not EVEN_KV:
            if full_end < SEQ_KV:
                acc, m_i, l_i = _attend_key_tile(
                    acc, m_i, l_i, q, q_scale, k_base, v_base, k_scale_base, mask_base, full_end, offs_n, offs_d,
                    stride_kn, stride_vd, stride_mn, SEQ_KV, qk_scale_log2, QUANT_BLOCK, HAS_MASK, True, V_PADDED,
                    MAGIC_I2F, INTERPRETED)

    v_scale = tl.load(VScale + bh * HEAD_DIM + offs_d)
    lse_shift = tl.load(LseShift + bh * SEQ_Q + offs_m, mask=row_ok, other=0.0)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    _finish(acc, m_i, l_i, lse_shift, v_scale, Out, Lse, o_ptrs, Lse + bh * SEQ_Q + offs_m, row_ok, qk_scale,
            INTERPRETED)


# ---- tuning data --------------------------------------------------------------------------------------------------


def _config(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Measured on an H100 at workload W's 1x12x32,760x128 (bench_attention.py --int8-sweep, 2026-12-07, with V rows
# 16-byte aligned; BENCHMARKS.md): dense / 15% ms - 128x128 4 warps 3 stages 23.8 / 3.91, 128x128 8 warps 2 stages
# 25.8 / 3.95, 64x128 4 warps 25.9 / 4.09, 128x128 8 warps 3 stages 27.6 / 4.20, 128x64 4 warps 36.5 / 5.04, 64x64
# 44.1 / 6.53. Accumulating P.V inside the MMA instead (one fp32 tile less in registers) was no faster (26.8-30.1 /
# 3.85-4.64) and is not kept. The four best stay candidates for the autotuner; 64x64 serves 64-token layout blocks
# (keep_config), 32x32 tiny ones (tests, interpreter).
CONFIGS: list[triton.Config] = [
    _config(128, 128, 4, 3),
    _config(128, 128, 8, 2),
    _config(64, 128, 4, 3),
    _config(128, 128, 8, 3),
    _config(64, 64, 4, 3),
    _config(32, 32, 4, 2),
]


def keep_config(config: triton.Config, head_dim: int, block_q: int, block_kv: int) -> bool:
    """A config fits when its tiles nest inside the layout's blocks (the dense entry point passes its own tiling);
    the autotuner gets the largest query tile that does and 64-row tiles (half the registers per warpgroup: the
    64x128 configs compile without spills for sm_90, tools/sm90_attention_report.py; a 64-row tile of a 128-row
    layout block walks its key list twice, so only a measurement can choose)."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    if block_q % bm or block_kv % bn or bm not in (min(block_q, 128), 64):
        return False
    return head_dim in SUPPORTED_HEAD_DIMS


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if keep_config(c, args["HEAD_DIM"], args["LAYOUT_BLOCK_Q"], args["LAYOUT_BLOCK_KV"])]
    return kept or [_config(32, 32, 4, 2)]


_autotuned = triton.autotune(
    configs=CONFIGS,
    key=["HEAD_DIM", "SPARSE", "LAYOUT_BLOCK_Q", "LAYOUT_BLOCK_KV", "HAS_MASK", "EVEN_KV", "V_PADDED", "QUANT_BLOCK"],
    prune_configs_by={"early_config_prune": _prune},
)(_attention_int8_fp8_fwd)


def default_config(head_dim: int, block_q: int, block_kv: int) -> dict:
    """The first config of ``CONFIGS`` that ``keep_config`` accepts (used where autotuning is not wanted)."""
    for c in CONFIGS:
        if keep_config(c, head_dim, block_q, block_kv):
            return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


# ---- launchers ----------------------------------------------------------------------------------------------------


V_PAD_TOKENS = 128  # the largest key tile (BLOCK_N) of CONFIGS: a tail tile of a padded V row stays in the padding


def v_padded(v_codes: torch.Tensor) -> bool:
    """Whether each V row (B, H, D, Skv) may be read up to the next multiple of ``V_PAD_TOKENS`` tokens: its row stride
    leaves room and the storage holds the last row's padding. Such rows must hold finite codes there (ops'
    ``quantize_v_per_channel`` writes zeros); the tail tile then loads without a mask, which compiled Triton keeps
    vectorized and pipelined - a mask over a row whose length is not a multiple of 16 is not (BENCHMARKS.md)."""
    b, h, d, skv = v_codes.shape
    padded = -(-skv // V_PAD_TOKENS) * V_PAD_TOKENS
    if v_codes.numel() == 0 or v_codes.stride(2) < padded or v_codes.stride(3) != 1:
        return False
    last_row_end = v_codes.storage_offset() + sum((n - 1) * st for n, st in zip(v_codes.shape[:3],
                                                                             v_codes.stride()[:3]))
    return last_row_end + padded <= v_codes.untyped_storage().nbytes() // v_codes.element_size()


def unsupported_reason(
    q_codes: torch.Tensor,
    q_scale: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    lse_shift: torch.Tensor,
    quant_block: int,
    kv_num_blocks: Optional[torch.Tensor] = None,
    kv_indices: Optional[torch.Tensor] = None,
    block_q: int = 128,
    block_kv: int = 128,
    key_padding_mask: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Optional[str]:
    """None if the kernels handle these inputs, else why not (shape/dtype checks only: no host sync)."""
    if q_codes.dtype != torch.int8 or k_codes.dtype != torch.int8 or v_codes.dtype != torch.float8_e4m3fn:
        return f"codes q={q_codes.dtype} k={k_codes.dtype} v={v_codes.dtype}: need int8, int8, float8_e4m3fn"
    if q_codes.ndim != 4 or k_codes.ndim != 4 or v_codes.ndim != 4:
        return "codes must be (B, H, S, D), V codes (B, H, D, Skv)"
    b, h, sq, d = q_codes.shape
    skv = k_codes.shape[2]
    if k_codes.shape[:2] != (b, h) or k_codes.shape[3] != d or tuple(v_codes.shape) != (b, h, d, skv):
        return (f"shapes q={tuple(q_codes.shape)} k={tuple(k_codes.shape)} v={tuple(v_codes.shape)}: need "
                "(B, H, Sq, D), (B, H, Skv, D), (B, H, D, Skv)")
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head dim {d} not in {SUPPORTED_HEAD_DIMS}"
    if out_dtype not in _OUT_DTYPES:
        return f"out_dtype {out_dtype}: needs one of {_OUT_DTYPES}"
    if quant_block < 1:
        return f"quant_block={quant_block} must be >= 1"
    q_tiles, k_tiles = -(-sq // quant_block), -(-skv // quant_block)
    expected = {"q_scale": (q_scale, (b, h, q_tiles)), "k_scale": (k_scale, (b, h, k_tiles)),
                "v_scale": (v_scale, (b, h, d)), "lse_shift": (lse_shift, (b, h, sq))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape or t.dtype != torch.float32 or not t.is_contiguous():
            return f"{name} {tuple(t.shape)} {t.dtype}: needs a contiguous fp32 {shape}"
    if any(t.stride(-1) != 1 for t in (q_codes, k_codes, v_codes)):
        return "the codes' last dim must have unit stride"
    if kv_num_blocks is not None:
        if block_q not in _SUPPORTED_LAYOUT_BLOCKS or block_kv not in _SUPPORTED_LAYOUT_BLOCKS:
            return f"layout blocks {block_q}x{block_kv}: each must be one of {_SUPPORTED_LAYOUT_BLOCKS}"
        qb, kvb = -(-sq // block_q), -(-skv // block_kv)
        if kv_num_blocks.dtype != torch.int32 or kv_indices is None or kv_indices.dtype != torch.int32:
            return "kv_num_blocks and kv_indices must be int32"
        if (kv_num_blocks.ndim != 3 or kv_indices.ndim != 4 or kv_num_blocks.shape[0] not in (1, b)
                or kv_num_blocks.shape[1] not in (1, h) or kv_num_blocks.shape[2] != qb
                or kv_indices.shape[:3] != kv_num_blocks.shape or kv_indices.shape[3] != kvb):
            return (f"layout kv_num_blocks {tuple(kv_num_blocks.shape)}, kv_indices {tuple(kv_indices.shape)} does "
                    f"not fit B={b}, H={h}, QB={qb}, KVB={kvb}")
    if key_padding_mask is not None:
        m = key_padding_mask
        if m.ndim != 4 or m.shape[0] not in (1, b) or m.shape[1:3] != (1, 1) or m.shape[3] != skv:
            return f"key_padding_mask {tuple(m.shape)}: needs (B|1, 1, 1, Skv={skv})"
        if m.dtype != torch.bool:
            return f"key_padding_mask dtype {m.dtype}: needs bool"
    tensors = [q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift]
    tensors += [t for t in (kv_num_blocks, kv_indices, key_padding_mask) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"tensors on different devices {devices}"
    return None


def _bcast_stride(t: torch.Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _launch(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, scale, key_padding_mask, quant_block,
            out_dtype, layout, config):
    """Shared by both entry points; ``layout`` = (kv_num_blocks, kv_indices, block_q, block_kv) or None (dense)."""
    b, h, sq, d = q_codes.shape
    skv = k_codes.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.empty((b, h, sq, d), dtype=out_dtype, device=q_codes.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q_codes.device)
    if layout is not None:
        kv_num, kv_idx, block_q, block_kv = layout
        kv_num = kv_num if kv_num.stride(-1) == 1 else kv_num.contiguous()
        kv_idx = kv_idx if kv_idx.stride(-1) == 1 else kv_idx.contiguous()
        layout_strides = (_bcast_stride(kv_num, 0), _bcast_stride(kv_num, 1), kv_num.stride(2),
                          _bcast_stride(kv_idx, 0), _bcast_stride(kv_idx, 1), kv_idx.stride(2))
    else:  # dense: tiles of 128 queries (the largest BLOCK_M) and any key tile; the layout slots are never read
        kv_num, kv_idx, block_q, block_kv = lse, lse, 128, 128
        layout_strides = (0,) * 6
    if key_padding_mask is not None:
        mask = key_padding_mask.view(torch.uint8)  # same bytes; Triton loads bytes more portably than i1
        mask_args = (mask, _bcast_stride(mask, 0), mask.stride(3))
    else:
        mask_args = (lse, 0, 0)  # never read (HAS_MASK=False)
    args = (
        q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, out, lse, kv_num, kv_idx, mask_args[0],
        float(scale),
        q_codes.stride(0), q_codes.stride(1), q_codes.stride(2),
        k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        v_codes.stride(0), v_codes.stride(1), v_codes.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *layout_strides,
        mask_args[1], mask_args[2],
        h, sq, skv, -(-sq // quant_block), -(-skv // quant_block),
    )
    meta = dict(HEAD_DIM=d, QUANT_BLOCK=quant_block, SPARSE=layout is not None, LAYOUT_BLOCK_Q=block_q,
                LAYOUT_BLOCK_KV=block_kv, HAS_MASK=key_padding_mask is not None, V_PADDED=v_padded(v_codes))

    def grid(m):
        return (triton.cdiv(sq, m["BLOCK_M"]), b * h)

    if config is None and q_codes.is_cuda:
        # EVEN_KV must hold for every candidate BLOCK_N (the autotuner picks it later): 128 and the layout block are
        # multiples of all of them.
        _autotuned[grid](*args, EVEN_KV=skv % max(128, block_kv) == 0, **meta)
        return out, lse
    if config is None:
        config = default_config(d, block_q if layout is not None else 32, block_kv if layout is not None else 32)
    bn = config["BLOCK_N"]
    # A register cap (ptxas .maxnreg) trades spills for more resident blocks per SM; only pinned configs carry one.
    cap = {"maxnreg": config["maxnreg"]} if config.get("maxnreg") and q_codes.is_cuda else {}
    _attention_int8_fp8_fwd[grid(config)](
        *args, EVEN_KV=skv % max(bn, block_kv if layout is not None else bn) == 0,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=bn, MAGIC_I2F=config.get("MAGIC_I2F", True),
        num_warps=config.get("num_warps", 4),
        num_stages=config.get("num_stages", 2), INTERPRETED=not q_codes.is_cuda, **cap, **meta,
    )
    return out, lse


def block_sparse_attention_int8_fp8(
    q_codes: torch.Tensor, q_scale: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, lse_shift: torch.Tensor,
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_q: int, block_kv: int,
    scale: Optional[float] = None, key_padding_mask: Optional[torch.Tensor] = None, quant_block: int = 64,
    out_dtype: torch.dtype = torch.bfloat16, *, config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit attention restricted to the layout's tiles; returns (out, lse). See the module docstring.
    ``config``: pin ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` instead of autotuning."""
    reason = unsupported_reason(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, quant_block,
                                kv_num_blocks, kv_indices, block_q, block_kv, key_padding_mask, out_dtype)
    if reason is not None:
        raise ValueError(f"qsparse_compiler.kernels.attention_int8_fp8: unsupported input: {reason}")
    return _launch(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, scale, key_padding_mask,
                   quant_block, out_dtype, (kv_num_blocks, kv_indices, block_q, block_kv), config)


def dense_attention_int8_fp8(
    q_codes: torch.Tensor, q_scale: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, lse_shift: torch.Tensor,
    scale: Optional[float] = None, key_padding_mask: Optional[torch.Tensor] = None, quant_block: int = 64,
    out_dtype: torch.dtype = torch.bfloat16, *, config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit attention over every key (the refresh step's dense attention); returns (out, lse)."""
    reason = unsupported_reason(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, quant_block,
                                key_padding_mask=key_padding_mask, out_dtype=out_dtype)
    if reason is not None:
        raise ValueError(f"qsparse_compiler.kernels.attention_int8_fp8: unsupported input: {reason}")
    return _launch(q_codes, q_scale, k_codes, k_scale, v_codes, v_scale, lse_shift, scale, key_padding_mask,
                   quant_block, out_dtype, None, config)
