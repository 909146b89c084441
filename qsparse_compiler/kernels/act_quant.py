"""Per-token dynamic 8-bit activation quantization, one pass over the activation (Triton).

    codes[m, k] = q(x[m, k] / scale[m])        scale[m] = max(amax_k |x[m, k]|, 1e-12) / QMAX   (fp32)

Formats (the math of ``qsparse_compiler.formats.quantization.quantize_activation``, which is the reference):
    fp8_e4m3  QMAX = 448, codes torch.float8_e4m3fn, q = clamp then round-to-nearest-even cast (Hopper MMA)
    int8      QMAX = 127, codes torch.int8,          q = round-half-even then clamp (portable MMA)
    uint8_msfp (``act_quant_asym``) codes torch.uint8 = round((x - min) / scale), scale = (max - min) / 255, plus the
              per-row zero (the minimum): for (near) non-negative inputs such as GELU outputs

``activation="gelu_tanh"`` applies GELU (tanh form) to x in fp32 right after the load, so a linear fed by a GELU
(a DiT's FFN down-projection) quantizes the GEMM's pre-activation output directly: the GELU costs no pass of its own.

One program owns ROWS rows. Up to K = 4096 a row is loaded into registers once, reduced to its amax and written back
as codes, so the activation is read exactly once and the codes written once (the memory-bound floor: 3 bytes moved
per element for a bf16 input); the tile is BLOCK_K = next_pow2(K) wide (masked past K). Longer rows (a DiT FFN's
8,960 or 13,824 features) go in TILE_K-column tiles, twice: statistics first, then codes (the second read mostly
hits L2) - a whole 16K-wide row per program spilled registers and ran at a third of the memory bandwidth.

Rounding: fp8 codes are rounded to the e4m3 grid in fp32 before the (then exact) cast, see
``rounding.round_to_e4m3_grid``. Each element is multiplied by the reciprocal of its row's scale (one IEEE division per row,
not per element: at DiT sizes the kernel is ALU-bound, not memory-bound, once a GELU runs in it), so v may be one
fp32 ulp off the reference's x / scale and a code a step away where v sits on a rounding boundary. int8 rounds half to even with the
"add and subtract 1.5 * 2**23" trick: exact for |v| < 2**22 (|v| <= 127 here), needs no libdevice (which the
interpreter cannot run) and compiles to two FADDs (Triton does not reassociate floating-point adds).

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rounding import round_to_e4m3_grid

__all__ = ["act_quant", "act_quant_asym", "ACT_QUANT_FORMATS", "ACTIVATIONS", "MAX_K"]

ACT_QUANT_FORMATS = ("fp8_e4m3", "int8")
_QMAX = {"fp8_e4m3": 448.0, "int8": 127.0}
_CODE_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
_AMAX_EPS = 1e-12  # same as formats/quantization.py: a row of zeros gets a tiny scale, not a division by zero
ACTIVATIONS = ("none", "gelu_tanh")  # applied to x before quantization (the kernel's PRE_GELU)
MAX_K = 32768  # whole row in registers; beyond this the tile would spill (no DiT has K > 13,824)


@triton.jit
def _gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = 2 sigmoid(2u) - 1 (no libdevice)."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return tl.fdiv(x, 1.0 + tl.exp(-2.0 * u), ieee_rounding=False)  # approximate division: the GELU's own error is larger


@triton.jit
def _load_tile(x_ptr, rows, row_ok, cols, K, stride_xm, PRE_GELU: tl.constexpr):
    mask = row_ok[:, None] & (cols < K)[None, :]
    # 64-bit row offsets: M * K exceeds 2**31 at 10^5 tokens x 13,824 features.
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if PRE_GELU:
        x = _gelu_tanh(x)  # gelu(0) = 0: masked lanes stay neutral for the max / min below
    return x, mask


@triton.jit
def _store_codes(q_ptr, rows, cols, mask, stride_qm, x, low, inv_scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
                 ASYM: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    if ASYM:
        v = (x - low[:, None]) * inv_scale[:, None]
        v = (v + 12582912.0) - 12582912.0
        v = tl.minimum(tl.maximum(v, 0.0), QMAX)
        codes = v.to(tl.uint8)
    elif IS_FP8:
        v = tl.minimum(tl.maximum(x * inv_scale[:, None], -QMAX), QMAX)
        codes = round_to_e4m3_grid(v).to(tl.float8e4nv)  # exact cast: v is on the e4m3 grid already
    else:
        v = (x * inv_scale[:, None] + 12582912.0) - 12582912.0  # round half to even (see module docstring)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        codes = v.to(tl.int8)
    if CHUNK > 0:
        # [even k | odd k] within each CHUNK of columns: the layout w4a8_gemm's A_SPLIT path reads (K % CHUNK == 0,
        # so the masked tail is whole chunks and the mask needs no permutation).
        tl.static_assert(BLOCK_K % CHUNK == 0, "act_quant: BLOCK_K must be a multiple of CHUNK")
        codes = codes.reshape(ROWS, BLOCK_K // CHUNK, CHUNK // 2, 2)
        codes = tl.permute(codes, (0, 1, 3, 2)).reshape(ROWS, BLOCK_K)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], codes, mask=mask)


@triton.jit
def _act_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    ASYM: tl.constexpr,
    CHUNK: tl.constexpr,
    EPS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TILES: tl.constexpr = 1,
    PRE_GELU: tl.constexpr = False,
):
    tl.static_assert(BLOCK_K >= 16, "act_quant: BLOCK_K must be >= 16")
    tl.static_assert((BLOCK_K & (BLOCK_K - 1)) == 0, "act_quant: BLOCK_K must be a power of two")
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    # Row statistics: TILES == 1 keeps the whole row in registers; longer rows take TILES tiles of BLOCK_K columns
    # twice (statistics, then codes; the second read comes from L2), which keeps registers low enough that several
    # programs share an SM instead of one spilling one.
    if TILES == 1:
        x, mask = _load_tile(x_ptr, rows, row_ok, cols, K, stride_xm, PRE_GELU)
        high = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        low = tl.min(tl.where(mask, x, float("inf")), axis=1)
    else:
        high = tl.full((ROWS,), float("-inf"), tl.float32)
        low = tl.full((ROWS,), float("inf"), tl.float32)
        for t in range(TILES):
            x_t, mask_t = _load_tile(x_ptr, rows, row_ok, t * BLOCK_K + cols, K, stride_xm, PRE_GELU)
            high = tl.maximum(high, tl.max(tl.where(mask_t, x_t, float("-inf")), axis=1))
            low = tl.minimum(low, tl.min(tl.where(mask_t, x_t, float("inf")), axis=1))
    if ASYM:
        # MSFP: codes 0..QMAX span [row min, row max].
        scale = tl.maximum(high - low, EPS) / QMAX
        tl.store(z_ptr + rows, low, mask=row_ok)
    else:
        scale = tl.maximum(tl.maximum(high, -low), EPS) / QMAX
    inv_scale = 1.0 / scale
    if TILES == 1:
        _store_codes(q_ptr, rows, cols, mask, stride_qm, x, low, inv_scale, QMAX, IS_FP8, ASYM, CHUNK, ROWS, BLOCK_K)
    else:
        for t in range(TILES):
            x_t, mask_t = _load_tile(x_ptr, rows, row_ok, t * BLOCK_K + cols, K, stride_xm, PRE_GELU)
            _store_codes(q_ptr, rows, t * BLOCK_K + cols, mask_t, stride_qm, x_t, low, inv_scale, QMAX, IS_FP8, ASYM,
                         CHUNK, ROWS, BLOCK_K)
    tl.store(s_ptr + rows, scale, mask=row_ok)


# Rows longer than this are quantized in tiles of TILE_K columns (two passes over the row) instead of whole.
WHOLE_ROW_MAX_K = 4096
TILE_K = 1024


def _launch_shape(k: int) -> tuple[int, int, int, int]:
    """(BLOCK_K, ROWS, num_warps, TILES): about 4-8K elements per program and <= 32-64 values per thread (no spills),
    loads 16 bytes wide. Measured on the H100 (2026-11-25): the whole-row form at K=8,960 (BLOCK_K=16,384, one row,
    16 warps) took 0.79 ms with the GELU prologue."""
    if k > WHOLE_ROW_MAX_K:
        return TILE_K, 4, 8, triton.cdiv(k, TILE_K)
    block_k = max(16, triton.next_power_of_2(k))
    rows = max(1, min(64, 8192 // block_k))
    num_warps = 4 if block_k * rows <= 4096 else 8
    return block_k, rows, num_warps, 1


def act_quant(
    x: torch.Tensor,
    act_format: str,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    chunk: int = 0,
    activation: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D activation (M, K) per row: returns codes (M, K) and fp32 scales (M,).

    ``chunk`` > 0 stores each row's codes as [even k | odd k] per ``chunk`` columns (K % chunk == 0): the layout
    the W4A8 GEMM pairs with the low / high weight nibbles (``w4a8_gemm(..., a_chunk=chunk)``).

    ``x`` must have a contiguous last dimension (any row stride); bf16, fp16 and fp32 inputs are accepted.
    ``out`` / ``scale_out`` may be given to write into preallocated buffers. ``activation`` (``ACTIVATIONS``) is
    applied to x first.
    """
    _check_activation(activation)
    if act_format not in _QMAX:
        raise ValueError(
            f"qsparse_compiler.kernels.act_quant: act_format={act_format!r} is not supported; "
            f"use one of {ACT_QUANT_FORMATS} (uint8_msfp has no kernel: use the reference op)"
        )
    if x.ndim != 2 or x.stride(-1) != 1:
        raise ValueError(
            f"qsparse_compiler.kernels.act_quant: need a 2-D (M, K) tensor with unit stride along K, got shape "
            f"{tuple(x.shape)} strides {tuple(x.stride())}; reshape(-1, K) and .contiguous() first"
        )
    m, k = x.shape
    if k > MAX_K:
        raise ValueError(f"qsparse_compiler.kernels.act_quant: K={k} > {MAX_K} does not fit one row tile; split K")
    if chunk and (k % chunk or chunk % 2 or chunk & (chunk - 1)):
        raise ValueError(f"qsparse_compiler.kernels.act_quant: chunk={chunk} must be a power of two dividing K={k}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"qsparse_compiler.kernels.act_quant: x.dtype={x.dtype}; expected bf16, fp16 or fp32")
    codes = out if out is not None else torch.empty((m, k), device=x.device, dtype=_CODE_DTYPE[act_format])
    scale = scale_out if scale_out is not None else torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    block_k, rows, num_warps, tiles = _launch_shape(k)
    grid = (triton.cdiv(m, rows),)
    _act_quant_kernel[grid](
        x,
        codes,
        scale,
        scale,  # no zero point in symmetric formats
        m,
        k,
        x.stride(0),
        codes.stride(0),
        QMAX=_QMAX[act_format],
        IS_FP8=act_format == "fp8_e4m3",
        ASYM=False,
        CHUNK=chunk,
        EPS=_AMAX_EPS,
        ROWS=rows,
        BLOCK_K=block_k,
        TILES=tiles,
        PRE_GELU=activation == "gelu_tanh",
        num_warps=num_warps,
    )
    return codes, scale


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"qsparse_compiler.kernels.act_quant: activation={activation!r}; use one of {ACTIVATIONS}")


def act_quant_asym(x: torch.Tensor, activation: str = "none") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "uint8_msfp" format: codes (M, K) uint8 = round((x - low) / scale), scale = (max - min) / 255 and
    zero = low = the row minimum (both fp32 (M,)), so x ~= codes * scale + zero. Same one-pass kernel."""
    _check_activation(activation)
    if x.ndim != 2 or x.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(
            f"qsparse_compiler.kernels.act_quant: need a 2-D (M, K) bf16/fp16/fp32 tensor with unit K-stride, got "
            f"{tuple(x.shape)} {x.dtype} strides {tuple(x.stride())}; reshape(-1, K) and .contiguous() first"
        )
    m, k = x.shape
    if k > MAX_K:
        raise ValueError(f"qsparse_compiler.kernels.act_quant: K={k} > {MAX_K} does not fit one row tile; split K")
    codes = torch.empty((m, k), device=x.device, dtype=torch.uint8)
    scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    zero = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, scale, zero
    block_k, rows, num_warps, tiles = _launch_shape(k)
    _act_quant_kernel[(triton.cdiv(m, rows),)](
        x, codes, scale, zero, m, k, x.stride(0), codes.stride(0),
        QMAX=255.0, IS_FP8=False, ASYM=True, CHUNK=0, EPS=_AMAX_EPS, ROWS=rows, BLOCK_K=block_k, TILES=tiles,
        PRE_GELU=activation == "gelu_tanh", num_warps=num_warps,
    )
    return codes, scale, zero
