"""LayerNorm + adaLN modulation + per-token 8-bit quantization in one pass over the activation (Triton).

    ln_modulate_quant(x, weight, bias, scale, shift, eps, act_format) -> (codes (M, K), act_scale (M,) fp32)

Contract (the kernel of ``qsparse::layer_norm_modulate_quant``):
    x            (B, S, K) bf16 / fp16 / fp32, feature dimension contiguous (any batch and token strides)
    weight, bias the LayerNorm's affine (K,) or None (Wan's norm1 / norm3 have none, norm2 has both)
    scale, shift the adaLN modulation, both or neither: (B|1, S|1, K), feature dimension contiguous - Wan 2.1's
                 (B, 1, K) rows of ``scale_shift_table + temb``, or Wan 2.2's per-token (B, S, K)
    codes        (B*S, K) contiguous, float8_e4m3fn or int8; ``act_scale`` (B*S,) fp32

Math per token row, the unfused graph's (``block.norm1(h.float()) * (1 + scale) + shift``, ``.type_as(h)``, then
``formats.quantization.quantize_activation_symmetric``):
    y = (x - mean) * rsqrt(var + eps) * weight + bias          fp32, biased variance, over the row's K features
    y = y * (1 + scale) + shift                                fp32
    y = round(y) to x's dtype                                  the graph's ``type_as``: kept, so the codes are those
                                                               of the bf16 activation the unfused graph quantizes
    act_scale = max(amax |y|, 1e-12) / QMAX; codes = q(y / act_scale)      (QMAX 448 for fp8_e4m3, 127 for int8)
Codes are stored by ``act_quant._store_codes``: the same rounding (fp8: the hardware's saturating round-to-nearest-even
conversion when compiled, the e4m3 grid in fp32 under the interpreter; int8: round half to even) and the same
reciprocal-of-scale multiply as the standalone quantization kernel. The bf16 rounding is a cast round trip when
compiled and ``rounding.round_to_bf16_grid`` under the interpreter (whose casts truncate): the same values.

Why: Inductor fuses this subgraph into one reduction kernel per norm (the three
``triton_red_fused__to_copy_abs_add_amax_clamp_..._native_layer_norm_...`` kernels of the H200 profile of the Wan-1.3B
reuse step, ~150 MB moved per call at a fraction of the bandwidth). Here one program holds ROWS whole rows in
registers (K <= 8192), each as up to four power-of-two pieces (``act_quant.row_pieces``: 1,536 = 1,024 + 512, so no
lane is padding and no load is masked): x is read once, codes (1 byte) and one scale per row written once - 3 bytes
per element for a bf16 input, the floor. The earlier form (one next_pow2(K)-wide tile, software fp8 and bf16
rounding) executed 54 sm_90 instructions per element at K = 1,536, issue-bound (0.124 ms on the H100 for 0.151 GB;
its int8 variant, 46 instructions, took 0.105 ms); this one executes 29 (tools/sm90_membound_report.py).

Launch configurations (``LAUNCH_CONFIGS``) are data, by padded row width. ``benchmarks/bench_membound.py`` times
them at workload W: the 2048-wide default (Wan-1.3B's 1,536 features) was the earlier form's measured best on an H100
(BENCHMARKS.md, "memory-bound fusions") and is the candidate with the fewest registers in this one (64 per thread,
8 programs per SM); the pieces are not yet timed, nor are the other widths' defaults.

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .act_quant import _load_piece, _piece_mask, _store_piece, piece_constexprs, row_pieces
from .rounding import round_to_bf16_grid

__all__ = ["ln_modulate_quant", "unsupported_reason", "LnLaunch", "LAUNCH_CONFIGS", "launch_config", "MAX_K"]

_QMAX = {"fp8_e4m3": 448.0, "int8": 127.0}
_CODE_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
_AMAX_EPS = 1e-12  # as ops/quantization.py
_ROUND_TO = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the graph's type_as, per model dtype


@dataclass(frozen=True)
class LnLaunch:
    """One program normalizes and quantizes ``rows`` token rows with ``num_warps`` warps."""

    rows: int
    num_warps: int


# By padded row width (next_pow2(K)): candidate launches, the first is the default; <= 64 fp32 values per thread.
# Wan-1.3B's rows are 1,536 -> 2,048 wide; Wan-14B's 5,120 -> 8,192.
LAUNCH_CONFIGS: dict[int, tuple[LnLaunch, ...]] = {
    512: (LnLaunch(8, 4), LnLaunch(16, 8), LnLaunch(4, 4)),
    1024: (LnLaunch(4, 4), LnLaunch(8, 8), LnLaunch(2, 4)),
    2048: (LnLaunch(2, 4), LnLaunch(4, 8), LnLaunch(1, 4), LnLaunch(8, 8)),
    4096: (LnLaunch(1, 4), LnLaunch(2, 8), LnLaunch(1, 8)),
    8192: (LnLaunch(1, 8), LnLaunch(1, 16), LnLaunch(2, 16)),
}
MAX_K = max(LAUNCH_CONFIGS)


def launch_config(k: int) -> tuple[LnLaunch, ...]:
    return LAUNCH_CONFIGS[max(min(LAUNCH_CONFIGS), triton.next_power_of_2(k))]


@triton.jit
def _ln_centered(x, cols, K, mean, COL_MASK: tl.constexpr):
    centered = x - mean[:, None]
    if COL_MASK:
        centered = tl.where((cols < K)[None, :], centered, 0.0)  # padding adds nothing to the variance
    return centered


@triton.jit
def _ln_modulate(centered, cols, K, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, scale_rows, shift_rows, row_ok,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATE: tl.constexpr, ROUND_TO: tl.constexpr,
                 COL_MASK: tl.constexpr, ROW_MASK: tl.constexpr, INTERPRETED: tl.constexpr):
    """One piece of y = round(((x - mean) rstd weight + bias) (1 + scale) + shift) to x's dtype (fp32 values)."""
    y = centered * rstd[:, None]
    col_ok = cols < K
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if MODULATE:
        # Loaded per element even when every row shares one modulation row (Wan 2.1: stride 0 over tokens; the
        # loads then hit L1): a vector broadcast over the rows measured more registers and instructions on sm_90
        # (122 vs 64 registers per thread at 2 rows x 4 warps, tools/sm90_membound_report.py).
        mask = _piece_mask(scale_rows, row_ok, cols, K, True, ROW_MASK)
        scale = tl.load(scale_ptr + scale_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + shift_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    if ROUND_TO == 1:
        if INTERPRETED:  # the interpreter's cast truncates
            y = round_to_bf16_grid(y)
        else:
            y = y.to(tl.bfloat16).to(tl.float32)
    elif ROUND_TO == 2:
        y = y.to(tl.float16).to(tl.float32)
    if COL_MASK:
        y = tl.where(col_ok[None, :], y, 0.0)
    return y


@triton.jit
def _ln_modulate_quant_kernel(
    x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, q_ptr, s_ptr,
    M, S, K,
    stride_xb, stride_xs, stride_mb, stride_ms, stride_hb, stride_hs,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATE: tl.constexpr, ROUND_TO: tl.constexpr,
    QMAX: tl.constexpr, IS_FP8: tl.constexpr, EPS_AMAX: tl.constexpr, ROWS: tl.constexpr,
    ROW_MASK: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
    MASK0: tl.constexpr, MASK1: tl.constexpr, MASK2: tl.constexpr, MASK3: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """ROWS whole rows per program, each held in registers as up to four power-of-two pieces (``act_quant.row_pieces``:
    1,536 = 1,024 + 512, no lane past K): loaded once, normalized, modulated, rounded, reduced to the row's amax and
    quantized from registers."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    batch = (rows // S).to(tl.int64)  # 64-bit offsets: M * K passes 2**31 at 10^5 tokens x 5,120 features
    token = (rows % S).to(tl.int64)
    x_rows = batch * stride_xb + token * stride_xs
    scale_rows = batch * stride_mb + token * stride_ms
    shift_rows = batch * stride_hb + token * stride_hs
    x0, c0 = _load_piece(x_ptr, x_rows, row_ok, K, 0, P0, MASK0, ROW_MASK, False, INTERPRETED)
    total = tl.sum(x0, axis=1)
    if P1 > 0:
        x1, c1 = _load_piece(x_ptr, x_rows, row_ok, K, P0, P1, MASK1, ROW_MASK, False, INTERPRETED)
        total += tl.sum(x1, axis=1)
    if P2 > 0:
        x2, c2 = _load_piece(x_ptr, x_rows, row_ok, K, P0 + P1, P2, MASK2, ROW_MASK, False, INTERPRETED)
        total += tl.sum(x2, axis=1)
    if P3 > 0:
        x3, c3 = _load_piece(x_ptr, x_rows, row_ok, K, P0 + P1 + P2, P3, MASK3, ROW_MASK, False, INTERPRETED)
        total += tl.sum(x3, axis=1)
    mean = total / K
    x0 = _ln_centered(x0, c0, K, mean, MASK0)
    squares = tl.sum(x0 * x0, axis=1)
    if P1 > 0:
        x1 = _ln_centered(x1, c1, K, mean, MASK1)
        squares += tl.sum(x1 * x1, axis=1)
    if P2 > 0:
        x2 = _ln_centered(x2, c2, K, mean, MASK2)
        squares += tl.sum(x2 * x2, axis=1)
    if P3 > 0:
        x3 = _ln_centered(x3, c3, K, mean, MASK3)
        squares += tl.sum(x3 * x3, axis=1)
    rstd = 1.0 / tl.sqrt(squares / K + eps)
    x0 = _ln_modulate(x0, c0, K, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, scale_rows, shift_rows, row_ok,
                      HAS_WEIGHT, HAS_BIAS, MODULATE, ROUND_TO, MASK0, ROW_MASK, INTERPRETED)
    amax = tl.max(tl.abs(x0), axis=1)
    if P1 > 0:
        x1 = _ln_modulate(x1, c1, K, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, scale_rows, shift_rows, row_ok,
                          HAS_WEIGHT, HAS_BIAS, MODULATE, ROUND_TO, MASK1, ROW_MASK, INTERPRETED)
        amax = tl.maximum(amax, tl.max(tl.abs(x1), axis=1))
    if P2 > 0:
        x2 = _ln_modulate(x2, c2, K, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, scale_rows, shift_rows, row_ok,
                          HAS_WEIGHT, HAS_BIAS, MODULATE, ROUND_TO, MASK2, ROW_MASK, INTERPRETED)
        amax = tl.maximum(amax, tl.max(tl.abs(x2), axis=1))
    if P3 > 0:
        x3 = _ln_modulate(x3, c3, K, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr, scale_rows, shift_rows, row_ok,
                          HAS_WEIGHT, HAS_BIAS, MODULATE, ROUND_TO, MASK3, ROW_MASK, INTERPRETED)
        amax = tl.maximum(amax, tl.max(tl.abs(x3), axis=1))
    act_scale = tl.maximum(amax, EPS_AMAX) / QMAX
    inv_scale = 1.0 / act_scale
    code_rows = rows.to(tl.int64)
    _store_piece(q_ptr, code_rows, row_ok, c0, K, K, x0, amax, inv_scale, QMAX, IS_FP8, False, 0, ROWS, P0, MASK0,
                 ROW_MASK, INTERPRETED)
    if P1 > 0:
        _store_piece(q_ptr, code_rows, row_ok, c1, K, K, x1, amax, inv_scale, QMAX, IS_FP8, False, 0, ROWS, P1, MASK1,
                     ROW_MASK, INTERPRETED)
    if P2 > 0:
        _store_piece(q_ptr, code_rows, row_ok, c2, K, K, x2, amax, inv_scale, QMAX, IS_FP8, False, 0, ROWS, P2, MASK2,
                     ROW_MASK, INTERPRETED)
    if P3 > 0:
        _store_piece(q_ptr, code_rows, row_ok, c3, K, K, x3, amax, inv_scale, QMAX, IS_FP8, False, 0, ROWS, P3, MASK3,
                     ROW_MASK, INTERPRETED)
    tl.store(s_ptr + rows, act_scale, mask=row_ok)


def block_constexprs(m: int, k: int, launch: LnLaunch) -> dict[str, object]:
    """The kernel's tiling of m rows of k features: rows per program, the row's pieces (``act_quant.row_pieces``)
    and which masks the loads and stores need."""
    return dict(ROWS=launch.rows, ROW_MASK=m % launch.rows != 0, **piece_constexprs(*row_pieces(k)))


def _broadcast_strides(t: torch.Tensor, batch: int, seq_len: int, k: int) -> Optional[tuple[int, int]]:
    """(batch, token) strides of a (B|1, S|1, K) modulation tensor, 0 where it broadcasts; None if it does not fit."""
    if t.ndim != 3 or t.shape[-1] != k or t.stride(-1) != 1 or t.shape[0] not in (1, batch) \
            or t.shape[1] not in (1, seq_len):
        return None
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def unsupported_reason(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], act_format: str) -> Optional[str]:
    """Why the kernel cannot take these inputs (None: it can). Works on meta and fake tensors."""
    if act_format not in _QMAX:
        return f"act_format={act_format!r}; the kernel writes {tuple(_QMAX)}"
    if x.ndim != 3 or x.stride(-1) != 1 or x.dtype not in _ROUND_TO:
        return f"x must be (B, S, K) bf16/fp16/fp32 with contiguous features, got {tuple(x.shape)} {x.dtype}"
    batch, seq_len, k = x.shape
    if k > MAX_K:
        return f"K={k} > {MAX_K}: a row does not fit the register tile"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.ndim != 1 or t.shape[0] != k or t.stride(0) != 1):
            return f"{name} has shape {tuple(t.shape)}, expected contiguous ({k},)"
    if (scale is None) != (shift is None):
        return "scale and shift must both be given or both be None"
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and _broadcast_strides(t, batch, seq_len, k) is None:
            return f"{name} has shape {tuple(t.shape)}, expected (B|1, S|1, {k}) with contiguous features"
    return None


def ln_modulate_quant(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    eps: float,
    act_format: str,
    config: Optional[LnLaunch] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize, modulate, round to x's dtype and quantize each token row of x (see the module docstring)."""
    reason = unsupported_reason(x, weight, bias, scale, shift, act_format)
    if reason is not None:
        raise ValueError(f"qsparse_compiler.kernels.ln_modulate_quant: {reason}")
    batch, seq_len, k = x.shape
    m = batch * seq_len
    codes = torch.empty((m, k), device=x.device, dtype=_CODE_DTYPE[act_format])
    act_scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, act_scale
    launch = config or launch_config(k)[0]
    modulate = scale is not None
    stride_m = _broadcast_strides(scale, batch, seq_len, k) if modulate else (0, 0)
    stride_h = _broadcast_strides(shift, batch, seq_len, k) if modulate else (0, 0)
    _ln_modulate_quant_kernel[(triton.cdiv(m, launch.rows),)](
        x, x if weight is None else weight, x if bias is None else bias,  # placeholders are never read
        scale if modulate else x, shift if modulate else x, codes, act_scale,
        m, seq_len, k,
        x.stride(0), x.stride(1), *stride_m, *stride_h,
        float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, MODULATE=modulate, ROUND_TO=_ROUND_TO[x.dtype],
        QMAX=_QMAX[act_format], IS_FP8=act_format == "fp8_e4m3", EPS_AMAX=_AMAX_EPS, INTERPRETED=not x.is_cuda,
        num_warps=launch.num_warps, **block_constexprs(m, k, launch),
    )
    return codes, act_scale
