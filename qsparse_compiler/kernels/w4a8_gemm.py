"""W4A8 GEMM (Triton): out = (a * a_scale) @ (int4 weight * group scale)^T + bias, 8-bit tensor-core MMA.

Operands (the storage format of ``qsparse_compiler.formats.quantization``):
    a        (M, K)     fp8 e4m3 or int8 activation codes, K contiguous       (kernels/act_quant.py)
    a_scale  (M,)       fp32 per-token scales
    qweight  (N, K//2)  uint8: q[n, 2j] in the low nibble, q[n, 2j+1] in the high nibble of qweight[n, j]
    wscale   (N, K//G)  bf16/fp16/fp32 group scales; G = K for per-channel weights
    bias     (N,)       optional
    out      (M, N)     bf16/fp16 (the dtype of the layer's input)
    MSFP (uint8 activation codes c with a per-token zero z: x ~= c * s + z) runs on the int8 MMA as c - 128 plus a
    rank-1 epilogue term (z + 128 s)[m] * wsum[n], wsum = row sums of the dequantized weight (a weight constant).

Per K-step (BK columns; BK divides G, so one step never straddles two groups):
    load a tile (BM, BK) and a packed tile (BN, BK//2); unpack the nibbles in registers into the MMA dtype;
    part = dot(a, w^T)  (fp8 x fp8 -> fp32, or int8 x int8 -> int32: both exact on tensor cores)
    acc += part * wscale[:, k // G]          (grouped weights; per-channel weights fold the scale into the epilogue)
Epilogue: acc * a_scale[:, None] (* wscale[None, :] per-channel) + bias, cast, masked store.

Unpacking — the cost that decides whether W4 can beat bf16 (each weight element is unpacked once per M-tile):
    fp8:  int4 -> e4m3 is a 16-entry table. UNPACK_ASM=True does it four bytes at a time in PTX: the nibbles of a
          16-bit half ARE four prmt selectors, so two byte-permutes look up the positive and negative tables and a
          third picks per byte by the sign bit (~2 integer ops per weight). UNPACK_ASM=False is plain Triton
          (sign-extend, int -> fp16 -> fp8 conversions), which the CPU interpreter can run.
    int8: the nibble shifted to the top of a byte IS an int8 code times 16 (lo: b << 4, hi: b & 0xF0): one op per
          weight and no table. The 16 goes into the epilogue scale. |sum| <= 127 * 128 * K < 2**31 for K < 132,000.

Tails: rows and columns past M / N load a valid row (index modulo M / N) and are masked at the store, so loads
stay unmasked and vectorized along K. K must be a multiple of BK (the launcher only offers configs that divide G
and K).

Modes (constexpr switches; measured on the H100 in benchmarks/results/w4a8_notes.md):
    SWAP_AB     out^T = w @ a^T: the weight is wgmma's A operand, read from shared memory straight into registers
                in the MMA layout and unpacked there (B always comes through shared memory).
    A_SPLIT     activation codes stored [even k | odd k] per 128 columns by act_quant(chunk=128): two half-K MMAs
                pair them with the low / high nibbles, so the weight needs no join into k order.
    W_UNPACKED  weights pre-unpacked to an 8-bit (N, K) scratch by kernels/int4_unpack.py: both operands stream
                through pipelined shared memory; the only mode where Triton keeps an fp8 wgmma in flight across
                k-steps (the others wait for each MMA: register-made operands, int8 wgmma, group scaling).
    RESCALE     grouped fp8: one accumulator kept in units of the current group's scale instead of a second
                per-group partial (frees 64-128 registers per thread: 2 CTAs per SM instead of 1).

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import triton
import triton.language as tl

from .rounding import round_to_bf16_grid

__all__ = ["w4a8_gemm", "GEMM_CONFIGS", "prune_configs", "m_bucket", "select_unpack_asm"]

# e4m3 codes of int4 values, packed as prmt lookup tables (byte i of the 8-byte pair = code of table entry i).
#   positive table, entries q = 0..7:   00 38 40 44 | 48 4A 4C 4E
#   negative table, entries q = -8..-1 (index q + 8): D0 CE CC CA | C8 C4 C0 B8
_UNPACK_FP8_ASM = tl.constexpr(
    """
{
.reg .b32 pl, ph, nl, nh, idx, sel, pos, neg, r0, r1, w;
mov.b32 pl, 0x44403800;
mov.b32 ph, 0x4E4C4A48;
mov.b32 nl, 0xCACCCED0;
mov.b32 nh, 0xB8C0C4C8;
and.b32 idx, $2, 0x7777;
prmt.b32 pos, pl, ph, idx;
prmt.b32 neg, nl, nh, idx;
shr.u32 sel, $2, 1;
and.b32 sel, sel, 0x4444;
or.b32 sel, sel, 0x3210;
prmt.b32 r0, pos, neg, sel;
shr.u32 w, $2, 16;
and.b32 idx, w, 0x7777;
prmt.b32 pos, pl, ph, idx;
prmt.b32 neg, nl, nh, idx;
shr.u32 sel, w, 1;
and.b32 sel, sel, 0x4444;
or.b32 sel, sel, 0x3210;
prmt.b32 r1, pos, neg, sel;
prmt.b32 $0, r0, r1, 0x6420;
prmt.b32 $1, r0, r1, 0x7531;
}
"""
)
# Why this is right: a 32-bit register holds 4 packed bytes = 8 nibbles q0..q7 in k order (byte j = q[2j] low,
# q[2j+1] high). prmt reads its selector from the low 16 bits, one nibble per output byte, and a nibble's bit 3
# would switch prmt to sign-replicate mode, so the index is masked to 3 bits and bit 3 (the int4 sign) instead
# chooses between the positive and the negative table (selector i or i+4 in the final prmt). r0 holds the codes
# of q0..q3, r1 of q4..q7; the last two prmts split them into the low nibbles (q0 q2 q4 q6) and the high
# nibbles (q1 q3 q5 q7) of the 4 input bytes, so each output element depends only on its own input byte
# (elementwise, as inline_asm_elementwise with pack=4 requires).


@triton.jit
def _unpack_pair(packed, A_INT8: tl.constexpr, UNPACK_ASM: tl.constexpr):
    """(BN, BK//2) uint8 -> (lo, hi), each (BN, BK//2) in the MMA dtype: lo[:, j] = q[2j], hi[:, j] = q[2j+1]."""
    if A_INT8:
        lo = (packed << 4).to(tl.int8, bitcast=True)  # q[2j] * 16
        hi = (packed & 0xF0).to(tl.int8, bitcast=True)  # q[2j+1] * 16
    elif UNPACK_ASM:
        lo, hi = tl.inline_asm_elementwise(
            _UNPACK_FP8_ASM, "=r,=r,r", [packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4
        )
        lo = lo.to(tl.float8e4nv, bitcast=True)
        hi = hi.to(tl.float8e4nv, bitcast=True)
    else:
        as_int = packed.to(tl.int16)
        lo = (((as_int & 0xF) ^ 8) - 8).to(tl.float16).to(tl.float8e4nv)  # exact: -8..7 are e4m3 values
        hi = (((as_int >> 4) ^ 8) - 8).to(tl.float16).to(tl.float8e4nv)
    return lo, hi


@triton.jit
def _load_a(ptrs, HAS_ZERO: tl.constexpr):
    a = tl.load(ptrs)
    if HAS_ZERO:
        a = (a ^ 0x80).to(tl.int8, bitcast=True)  # uint8 code c -> c - 128; the 128 moves to the zero point
    return a


@triton.jit
def _scale_add(acc, part, gscale, A_INT8: tl.constexpr, SWAP_AB: tl.constexpr, BK: tl.constexpr):
    """acc + part * group scale (per output channel)."""
    if A_INT8:
        # int32 -> fp32 by the exponent trick (IADD + FADD at full rate) instead of I2F, which runs at 1/4 rate and
        # made the int8 path conversion-bound. Exact for |part| < 2**22: |a| <= 128, |16 q| <= 128, BK <= 256 terms.
        tl.static_assert(BK <= 256, "w4a8_gemm: the int32->fp32 trick needs BK <= 256")
        partf = (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        partf = part
    if SWAP_AB:
        return acc + partf * gscale[:, None]
    else:
        return acc + partf * gscale[None, :]


@triton.jit
def _mma(a, b, acc, SWAP_AB: tl.constexpr, out_dtype: tl.constexpr):
    """a (BM, k) @ b (BN, k)^T, or its transpose (BN, BM) with the weight as the MMA's A operand."""
    if SWAP_AB:
        return tl.dot(b, tl.trans(a), acc, out_dtype=out_dtype)
    else:
        return tl.dot(a, tl.trans(b), acc, out_dtype=out_dtype)


@triton.jit
def _w4a8_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    a_zero_ptr,
    wsum_ptr,
    c_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only: one config per power-of-two token count, not per exact M
    stride_am,
    stride_wn,
    stride_sn,
    stride_cm,
    GROUP: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    A_INT8: tl.constexpr,
    UNPACK_ASM: tl.constexpr,
    INTERPRET_ROUND_BF16: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
    A_SPLIT: tl.constexpr,
    W_UNPACKED: tl.constexpr,
    RESCALE: tl.constexpr,
):
    tl.static_assert(BK % 32 == 0, "w4a8_gemm: BK must be a multiple of 32 (8-bit MMA K-width)")
    tl.static_assert(GROUP % BK == 0, "w4a8_gemm: BK must divide the weight group size")
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    # Grouped tile order: GROUP_M consecutive M-tiles walk the N-tiles together, so a band of weights stays in L2.
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    # Tiles: rows / columns past M / N read a valid row (index modulo M / N), so the K-loop loads stay unmasked
    # and 16 bytes wide (that width comes from K); the store drops those rows. No contiguity hint on the wrapped
    # indices: in a tail tile they are not contiguous, and a hint made the per-row vector loads below 16-byte
    # loads from 4-byte-aligned addresses when M % 4 != 0 ("misaligned address" on the H100 at M = 4101).
    # Per-row / per-column vectors load from offs_m / offs_n with a mask instead (contiguous by construction).
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_kh = tl.arange(0, BK // 2)
    if W_UNPACKED:
        tl.static_assert(not A_SPLIT, "w4a8_gemm: pre-unpacked weights are in k order; use natural-order codes")
    if A_SPLIT:
        # Activation codes stored [even k | odd k] per BK chunk (act_quant(..., chunk=BK)): two half-tiles pair with
        # the low / high nibbles directly, so the weight needs no join into k order.
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_kh[None, :]
    else:
        a_ptrs = a_ptr + rows[:, None] * stride_am + tl.arange(0, BK)[None, :]
    if W_UNPACKED:
        # (N, K) 8-bit weights from kernels/int4_unpack.py: streamed through pipelined shared memory like A.
        w_ptrs = w_ptr + cols[:, None] * stride_wn + tl.arange(0, BK)[None, :]
    else:
        w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_kh[None, :]
    s_ptrs = w_scale_ptr + cols * stride_sn

    if A_INT8:
        acc_dtype = tl.int32
    else:
        acc_dtype = tl.float32
    # Per-channel: the tensor cores accumulate over all of K (int32 for int8). Grouped: an fp32 sum of scaled parts,
    # or (RESCALE, fp8 only) one accumulator kept in units of the current group's scale: before group g's MMA it is
    # multiplied by s[g-1] / s[g], and the epilogue multiplies by the last group's scale. That saves the second
    # (BM, BN) accumulator (registers -> occupancy) at one multiply per element and group.
    tl.static_assert(not (RESCALE and (A_INT8 or PER_CHANNEL)), "w4a8_gemm: RESCALE is for grouped fp8 only")
    if PER_CHANNEL:
        total_dtype = acc_dtype
    else:
        total_dtype = tl.float32
    if SWAP_AB:
        acc = tl.zeros((BN, BM), dtype=total_dtype)
    else:
        acc = tl.zeros((BM, BN), dtype=total_dtype)
    s_prev = tl.load(s_ptrs).to(tl.float32)
    for k in range(0, K, BK):
        if RESCALE:
            s_cur = tl.load(s_ptrs + k // GROUP).to(tl.float32)
            ratio = s_prev / s_cur
            if SWAP_AB:
                acc = acc * ratio[:, None]
            else:
                acc = acc * ratio[None, :]
            s_prev = s_cur
        if not W_UNPACKED:  # (constexpr branches: names bound in the taken one only are fine)
            lo, hi = _unpack_pair(tl.load(w_ptrs), A_INT8, UNPACK_ASM)
        if A_SPLIT:
            a_lo = _load_a(a_ptrs, HAS_ZERO)
            a_hi = _load_a(a_ptrs + BK // 2, HAS_ZERO)
            if PER_CHANNEL or RESCALE:
                # One scale per output channel: accumulate on the tensor cores, scale once in the epilogue.
                acc = _mma(a_lo, lo, acc, SWAP_AB, acc_dtype)
                acc = _mma(a_hi, hi, acc, SWAP_AB, acc_dtype)
            else:
                part = _mma(a_lo, lo, None, SWAP_AB, acc_dtype)
                part = _mma(a_hi, hi, part, SWAP_AB, acc_dtype)
        else:
            a = _load_a(a_ptrs, HAS_ZERO)
            if W_UNPACKED:
                b = tl.load(w_ptrs)
            else:
                b = tl.join(lo, hi).reshape(BN, BK)  # k order: the joined axis is register-local, reshape is free
            if PER_CHANNEL or RESCALE:
                acc = _mma(a, b, acc, SWAP_AB, acc_dtype)
            else:
                part = _mma(a, b, None, SWAP_AB, acc_dtype)
        if not (PER_CHANNEL or RESCALE):
            gscale = tl.load(s_ptrs + k // GROUP).to(tl.float32)
            acc = _scale_add(acc, part, gscale, A_INT8, SWAP_AB, BK)
        a_ptrs += BK
        if W_UNPACKED:
            w_ptrs += BK
        else:
            w_ptrs += BK // 2

    if SWAP_AB:
        acc = tl.trans(acc)
    acc = acc.to(tl.float32)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
    if HAS_ZERO:
        # x ~= c * s + z = (c - 128) * s + (z + 128 s): the shifted zero times the weight's row sums (rank-1 term)
        zero = tl.load(a_zero_ptr + offs_m, mask=m_ok, other=0.0) + 128.0 * a_scale
    if A_INT8:
        a_scale = a_scale * 0.0625  # the unpacked int8 weights are q * 16
    acc = acc * a_scale[:, None]
    if PER_CHANNEL or RESCALE:
        acc = acc * s_prev[None, :]  # per-channel: the only scale; RESCALE: the last group's
    if HAS_ZERO:
        acc += zero[:, None] * tl.load(wsum_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if INTERPRET_ROUND_BF16:
        acc = round_to_bf16_grid(acc)  # CPU interpreter only: its bf16 cast truncates (kernels/rounding.py)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ---- autotuning: configs as data, a filter decides which apply to a problem --------------------------------------


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, swap: bool = False, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m, "SWAP_AB": swap}, num_warps=warps, num_stages=stages
    )


# Measured on the H100 (benchmarks/bench_linear.py --sweep): 128x256x64, 256x128 (non-swapped) and 4-warp 128x128
# tiles spilled and ran 1.5-2x slower, so they are gone. BK = 128 = the default group size: one scale per k-step.
# The interpreter gets only the 16x32 tiles (CPU time).
GEMM_CONFIGS: list[triton.Config] = [
    # SWAP_AB: the weight tile is wgmma's A operand, loaded from shared memory straight into the register layout
    # of the MMA and unpacked there (with A_SPLIT no join, no shared-memory round trip for the weights).
    _cfg(128, 128, 128, 8, 4, swap=True),
    _cfg(128, 128, 128, 8, 3, swap=True),
    _cfg(64, 128, 128, 8, 4, swap=True),
    _cfg(256, 128, 128, 8, 3, swap=True),
    # Activation tile as wgmma's A; the unpacked weights go through shared memory.
    _cfg(128, 256, 128, 8, 3),
    _cfg(128, 128, 128, 8, 4),
    _cfg(64, 128, 128, 4, 4),
    _cfg(128, 128, 64, 8, 4),
    # Only with pre-unpacked weights (register-unpacking variants of these spilled on the H100).
    _cfg(256, 128, 128, 8, 3),
    _cfg(128, 256, 64, 8, 4),
    _cfg(128, 128, 64, 8, 5),
    # Small M (decode-like) and group sizes 32 / 64.
    _cfg(64, 64, 64, 4, 4),
    _cfg(32, 64, 32, 4, 2),
    _cfg(16, 32, 32, 4, 1),
    _cfg(16, 32, 128, 4, 1),
]


def _tile_key(c: triton.Config) -> tuple:
    kw = c.kwargs
    return (kw["BM"], kw["BN"], kw["BK"], c.num_warps, c.num_stages, kw["SWAP_AB"])


_PRE_UNPACKED_ONLY = {(256, 128, 128, 8, 3, False), (128, 256, 64, 8, 4, False), (128, 128, 64, 8, 5, False)}


_LARGE_M_PRE_UNPACKED = {
    (128, 256, 128, 8, 3, False), (256, 128, 128, 8, 3, False), (128, 128, 128, 8, 4, False), (128, 256, 64, 8, 4, False)
}


def prune_configs(configs: Iterable[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep configs whose BK divides the group (and K), whose tiles are not far larger than the problem, and, under
    the CPU interpreter, only the smallest (each interpreted program costs milliseconds)."""
    group = named_args["GROUP"] if "GROUP" in named_args else kwargs["GROUP"]
    a_split = named_args.get("A_SPLIT", kwargs.get("A_SPLIT", False))
    per_channel = named_args.get("PER_CHANNEL", kwargs.get("PER_CHANNEL", False))
    per_channel = per_channel or named_args.get("RESCALE", kwargs.get("RESCALE", False))  # one accumulator too
    w_unpacked = named_args.get("W_UNPACKED", kwargs.get("W_UNPACKED", False))
    a_int8 = named_args.get("A_INT8", kwargs.get("A_INT8", False))
    m, n = named_args["M"], named_args["N"]
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        if group % bk or (a_split and bk != SPLIT_CHUNK):
            continue
        if interpret:
            # One config, so the autotuner does not benchmark interpreted runs.
            if (bm, bn) == (16, 32) and not kept:
                kept.append(c)
            continue
        if bm > 2 * max(m, 16) or bn > 2 * n or (m >= 1024 and bm * bn < 64 * 128):
            continue
        if not w_unpacked and _tile_key(c) in _PRE_UNPACKED_ONLY:
            continue
        if w_unpacked and c.kwargs["SWAP_AB"]:
            continue  # both operands come from shared memory: the swap buys nothing
        if c.kwargs["SWAP_AB"] and not a_split and not a_int8:
            # fp8 + joined (k-order) weights as the register operand: a run on the H100 (Triton 3.6, M=4101, two
            # accumulators) died with "misaligned address". The likely cause (a false contiguity hint on wrapped
            # row indices) is fixed above, but this combination has not run on a GPU since; the split layout is
            # the tested fp8 swap path.
            continue
        if c.kwargs["SWAP_AB"] and not per_channel and bm * bn > 128 * 128:
            continue  # grouped scaling keeps a second (BN, BM) accumulator: these tiles spill
        kept.append(c)
    if m >= 1024 and not interpret:
        # Large M: only the families that won the H100 sweep (compile time is seconds per config): register
        # unpacking -> the swapped tiles; pre-unpacked weights -> the large non-swapped tiles.
        preferred = [c for c in kept if _tile_key(c) in _LARGE_M_PRE_UNPACKED] if w_unpacked else [
            c for c in kept if c.kwargs["SWAP_AB"]]
        kept = preferred or kept
    if not kept:  # the launcher checked that BK=32 (or the split chunk) divides the group, so one always fits
        kept = [c for c in configs if group % c.kwargs["BK"] == 0 and (not a_split or c.kwargs["BK"] == SPLIT_CHUNK)][-1:]
    return kept


SPLIT_CHUNK = 128  # the BK of the A_SPLIT layout: act_quant(..., chunk=SPLIT_CHUNK) writes codes for it


def m_bucket(m: int) -> int:
    """Power-of-two bucket of the token count: the autotune key, so a new M reuses its bucket's tuned config."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 17)


_w4a8_gemm_tuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "GROUP", "PER_CHANNEL", "A_INT8", "HAS_ZERO", "UNPACK_ASM", "A_SPLIT", "W_UNPACKED", "RESCALE"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_w4a8_gemm_kernel)


def select_unpack_asm() -> bool:
    """Inline PTX needs a real NVIDIA GPU; the interpreter runs the plain-Triton unpack of the same kernel."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.version.hip is None


def w4a8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    out_dtype: torch.dtype,
    unpack_asm: bool | None = None,
    config: triton.Config | None = None,
    compiled_out: list | None = None,
    a_zero: torch.Tensor | None = None,
    wsum: torch.Tensor | None = None,
    a_chunk: int = 0,
    w_unpacked: torch.Tensor | None = None,
    rescale: bool | None = None,
) -> torch.Tensor:
    """out (M, N) = (a * a_scale[:, None]) @ dequant(qweight, wscale)^T + bias, in ``out_dtype``.

    ``group_size`` 0 means per-channel. ``config`` pins one triton.Config (benchmarks, tests) instead of autotuning;
    with it, ``compiled_out`` (a list) receives the compiled kernel (asm, registers, spills) for inspection.
    ``a_chunk`` = SPLIT_CHUNK says the codes were written by ``act_quant(..., chunk=SPLIT_CHUNK)`` ([even k | odd k]
    per chunk): the kernel then pairs half-tiles of codes with the low / high nibbles and skips the weight's join.
    ``w_unpacked`` = ``int4_unpack.unpack_int4_to_mma(qweight, fmt)`` switches to the pre-unpacked mode: both
    operands stream through pipelined shared memory (qweight then only supplies the shape).
    ``rescale`` (grouped fp8 only; default on) keeps one rescaled accumulator instead of a per-group partial.
    Raises ValueError for shapes the kernel cannot do; callers that can fall back should check ``supports`` first.
    """
    problem = supports(a, qweight, wscale, group_size, out_dtype, a_chunk)
    if problem is not None:
        raise ValueError(f"qsparse_compiler.kernels.w4a8_gemm: {problem}")
    m, k = a.shape
    n = qweight.shape[0]
    group = k if group_size == 0 else group_size
    out = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0:
        return out
    per_channel = group_size == 0 or group == k
    if rescale is None:
        rescale = a.dtype == torch.float8_e4m3fn and not per_channel
    if rescale and (a.dtype != torch.float8_e4m3fn or per_channel):
        raise ValueError("qsparse_compiler.kernels.w4a8_gemm: rescale=True needs fp8 codes and grouped weights")
    if unpack_asm is None:
        unpack_asm = select_unpack_asm()
    has_zero = a.dtype == torch.uint8
    if has_zero and (a_zero is None or wsum is None):
        raise ValueError(
            "qsparse_compiler.kernels.w4a8_gemm: uint8 (MSFP) activations need a_zero (M,) and wsum (N,) = the "
            "row sums of the dequantized weight"
        )
    zero_args = (a_zero, wsum) if has_zero else (a_scale, a_scale)
    if w_unpacked is not None:
        want = torch.int8 if a.dtype in (torch.int8, torch.uint8) else torch.float8_e4m3fn
        if w_unpacked.shape != (n, k) or w_unpacked.dtype != want or not w_unpacked.is_contiguous() or a_chunk:
            raise ValueError(
                f"qsparse_compiler.kernels.w4a8_gemm: w_unpacked must be a contiguous ({n}, {k}) {want} tensor from "
                f"unpack_int4_to_mma and a_chunk must be 0, got {tuple(w_unpacked.shape)} {w_unpacked.dtype}"
            )
    w_arg = qweight if w_unpacked is None else w_unpacked
    args = (a, a_scale, w_arg, wscale, bias if bias is not None else a_scale, *zero_args, out, m, n, k, m_bucket(m))
    strides = (a.stride(0), w_arg.stride(0), wscale.stride(0), out.stride(0))
    flags = dict(
        GROUP=group,
        PER_CHANNEL=per_channel,
        HAS_BIAS=bias is not None,
        HAS_ZERO=has_zero,
        A_INT8=a.dtype in (torch.int8, torch.uint8),
        UNPACK_ASM=bool(unpack_asm),
        INTERPRET_ROUND_BF16=out_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1",
        A_SPLIT=a_chunk != 0,
        W_UNPACKED=w_unpacked is not None,
        RESCALE=bool(rescale),
    )
    if config is None and not a.is_cuda:
        # The interpreter: nothing to time, so the first config the pruning keeps (Triton 3.7's autotuner times even
        # a single remaining config, and needs a GPU driver for that).
        config = prune_configs(GEMM_CONFIGS, {"M": m, "N": n, **flags})[0]
    if config is None:

        def grid(meta: dict[str, Any]) -> tuple[int]:
            return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

        _w4a8_gemm_tuned[grid](*args, *strides, **flags)
    else:
        kw = dict(config.kwargs)
        if kw["SWAP_AB"] and not a_chunk and a.dtype == torch.float8_e4m3fn:
            raise ValueError(
                "qsparse_compiler.kernels.w4a8_gemm: a SWAP_AB tile with fp8 codes needs the split code layout "
                "(act_quant(..., chunk=SPLIT_CHUNK) and a_chunk=SPLIT_CHUNK); the joined-weight variant faulted "
                "(misaligned address) on the H100 with Triton 3.6 and is not re-verified"
            )
        grid_size = triton.cdiv(m, kw["BM"]) * triton.cdiv(n, kw["BN"])
        compiled = _w4a8_gemm_kernel[(grid_size,)](
            *args, *strides, **flags, **kw, num_warps=config.num_warps, num_stages=config.num_stages
        )
        if compiled_out is not None:
            compiled_out.append(compiled)
    return out


def supports(
    a: torch.Tensor,
    qweight: torch.Tensor,
    wscale: torch.Tensor,
    group_size: int,
    out_dtype: torch.dtype,
    a_chunk: int = 0,
) -> str | None:
    """None if the kernel handles this problem, else the reason (names the shape and what would work)."""
    if a.ndim != 2 or a.stride(-1) != 1 or a.dtype not in (torch.float8_e4m3fn, torch.int8, torch.uint8):
        return (
            f"a must be 2-D (M, K) fp8_e4m3fn/int8/uint8 codes with unit K-stride, got {tuple(a.shape)} {a.dtype} "
            f"strides {tuple(a.stride())}"
        )
    m, k = a.shape
    if qweight.ndim != 2 or qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != k or qweight.stride(-1) != 1:
        return f"qweight must be (N, K//2)=(N, {k // 2}) uint8 with unit stride, got {tuple(qweight.shape)} {qweight.dtype}"
    group = k if group_size == 0 else group_size
    if k % group or group % 32:
        return f"K={k} and group_size={group_size} need K % G == 0 and G % 32 == 0 (8-bit MMA K-width)"
    if wscale.shape != (qweight.shape[0], k // group) or wscale.stride(-1) != 1:
        return f"wscale must be (N, K//G)=({qweight.shape[0]}, {k // group}), got {tuple(wscale.shape)}"
    if a_chunk not in (0, SPLIT_CHUNK) or (a_chunk and group % a_chunk):
        return f"a_chunk={a_chunk} must be 0 or {SPLIT_CHUNK} and divide the group size {group}"
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"out_dtype={out_dtype} unsupported; use bf16, fp16 or fp32"
    return None
