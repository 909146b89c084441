"""Per-token dynamic 8-bit activation quantization, one pass over the activation (Triton).

    codes[m, k] = q(x[m, k] / scale[m])        scale[m] = max(amax_k |x[m, k]|, 1e-12) / QMAX   (fp32)

Formats (the math of ``qsparse_compiler.formats.quantization.quantize_activation``, which is the reference):
    fp8_e4m3  QMAX = 448, codes torch.float8_e4m3fn, q = clamp then round-to-nearest-even cast (Hopper MMA)
    int8      QMAX = 127, codes torch.int8,          q = round-half-even then clamp (portable MMA)
    uint8_msfp (``act_quant_asym``) codes torch.uint8 = round((x - min) / scale), scale = (max - min) / 255, plus the
              per-row zero (the minimum): for (near) non-negative inputs such as GELU outputs

``activation="gelu_tanh"`` applies GELU (tanh form) to x in fp32 right after the load, so a linear fed by a GELU
(a DiT's FFN down-projection) quantizes the GEMM's pre-activation output directly: the GELU costs no pass of its own.

One program owns ROWS whole rows (one row from 8,192 features on) and holds each in registers as up to four
power-of-two pieces (``row_pieces``: 8,960 = 8,192 + 512 + 256, 1,536 = 1,024 + 512; only a last piece may reach past
K, masked), so every element is loaded once, activated once, reduced to the row's amax and quantized from registers:
3 bytes moved per element for a bf16 input, the memory-bound floor. Why pieces: a single power-of-two tile wastes up
to half its lanes (8,960 in 16,384: the GELU then ran on 45% padding), and the earlier alternative for long rows -
1,024-column tiles read twice, statistics then codes - computed the GELU twice and reduced every tile across the
program. On sm_90 (tools/sm90_membound_report.py, SASS compiled on the CPU) that form executed 56 thread-instructions
per element at K = 8,960 with the GELU, about twice what the H100 can issue while HBM delivers 3 bytes: the kernel
was issue-bound (0.60 ms on the H200 against 0.18 ms for its bytes, BENCHMARKS.md).

Rounding: compiled for the GPU, fp8 codes come from one saturating round-to-nearest-even conversion
(cvt.rn.satfinite); under the interpreter (``INTERPRETED``), whose fp32 -> fp8 cast truncates, v is clamped and
rounded onto the e4m3 grid in fp32 first (``rounding.round_to_e4m3_grid``), so both give the same codes. Each element
is multiplied by the reciprocal of its row's scale (one IEEE division per row, not per element), so v may be one fp32
ulp off the reference's x / scale and a code a step away where v sits on a rounding boundary. int8 rounds half to
even with the "add and subtract 1.5 * 2**23" trick: exact for |v| < 2**22 (|v| <= 127 here), needs no libdevice
(which the interpreter cannot run) and compiles to two FADDs (Triton does not reassociate floating-point adds). The
GELU's ex2 and reciprocal are the flush-to-zero approximations when compiled (``_gelu_tanh``).

This module imports nothing from qsparse_compiler outside kernels/ (kernels/ rule).
"""

from __future__ import annotations

from dataclasses import dataclass

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


# GELU(tanh) = x * sigmoid(2u) = x / (1 + 2**(x * (A + B x^2))), u = sqrt(2/pi) (x + 0.044715 x^3): the constants
# folded so the compiled form is three fp32 ops, ex2, one add, rcp, one multiply.
_GELU_A = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634)
_GELU_B = tl.constexpr(-2.0 * 0.7978845608028654 * 1.4426950408889634 * 0.044715)


@triton.jit
def _gelu_tanh(x, INTERPRETED: tl.constexpr):
    """GELU (tanh form) in fp32. Compiled: ex2 and rcp as the flush-to-zero approximations (one MUFU instruction
    each, relative errors ~2**-22; the plain forms add a denormal range fix-up of three instructions apiece). Large
    |x| saturates exactly: 2**z overflows to inf and 1/inf = 0 (x -> -0), or underflows to 0 (x -> x)."""
    z = x * (_GELU_A + _GELU_B * (x * x))
    if INTERPRETED:
        return x / (1.0 + tl.exp2(z))
    else:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True,
                                      pack=1)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return x * r


@triton.jit
def _store_codes(q_ptr, rows64, cols, mask, stride_qm, x, low, inv_scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
                 ASYM: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                 MASKED: tl.constexpr, INTERPRETED: tl.constexpr):
    """Quantize x ([ROWS, WIDTH] fp32 of rows ``rows64``, columns ``cols``) with the rows' 1 / scale and store the
    codes (``mask`` is used only if MASKED: otherwise every element is in bounds and the store is unmasked)."""
    if ASYM:
        v = (x - low[:, None]) * inv_scale[:, None]
        v = (v + 12582912.0) - 12582912.0
        v = tl.minimum(tl.maximum(v, 0.0), QMAX)
        codes = v.to(tl.uint8)
    elif IS_FP8:
        v = x * inv_scale[:, None]
        if INTERPRETED:
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            codes = round_to_e4m3_grid(v).to(tl.float8e4nv)  # exact cast: v is on the e4m3 grid already
        else:
            # cvt.rn.satfinite: round to nearest even and saturate at +-448, one instruction per two values (|v|
            # exceeds 448 by at most an fp32 ulp here: the same codes as clamping first).
            codes = v.to(tl.float8e4nv)
    else:
        v = (x * inv_scale[:, None] + 12582912.0) - 12582912.0  # round half to even (see module docstring)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        codes = v.to(tl.int8)
    if CHUNK > 0:
        # [even k | odd k] within each CHUNK of columns: the layout w4a8_gemm's A_SPLIT path reads (K % CHUNK == 0,
        # so a masked piece ends in whole chunks and the mask needs no permutation).
        tl.static_assert(WIDTH % CHUNK == 0, "act_quant: a row piece must be a multiple of CHUNK")
        codes = codes.reshape(ROWS, WIDTH // CHUNK, CHUNK // 2, 2)
        codes = tl.permute(codes, (0, 1, 3, 2)).reshape(ROWS, WIDTH)
    if MASKED:
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], codes, mask=mask)
    else:
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], codes)


@triton.jit
def _piece_mask(row_offsets, row_ok, cols, K, COL_MASK: tl.constexpr, ROW_MASK: tl.constexpr):
    """[ROWS, WIDTH] in-bounds mask of a piece (used only where COL_MASK or ROW_MASK; ``row_offsets``, any
    non-negative per-row values, give the rows' shape where only columns are masked)."""
    if COL_MASK and ROW_MASK:
        return row_ok[:, None] & (cols < K)[None, :]
    elif COL_MASK:
        return (row_offsets >= 0)[:, None] & (cols < K)[None, :]
    else:
        return row_ok[:, None] & (cols >= 0)[None, :]


@triton.jit
def _load_piece(x_ptr, row_offsets, row_ok, K, OFF: tl.constexpr, WIDTH: tl.constexpr, COL_MASK: tl.constexpr,
                ROW_MASK: tl.constexpr, PRE_GELU: tl.constexpr, INTERPRETED: tl.constexpr):
    """Columns [OFF, OFF + WIDTH) of the program's rows (``row_offsets``: each row's first element, in elements) as
    fp32 (GELU applied) and their column indices; the load is unmasked (vectorized) where the piece lies inside K and
    every row exists."""
    cols = OFF + tl.arange(0, WIDTH)
    ptrs = x_ptr + row_offsets[:, None] + cols[None, :]
    if COL_MASK or ROW_MASK:
        x = tl.load(ptrs, mask=_piece_mask(row_offsets, row_ok, cols, K, COL_MASK, ROW_MASK), other=0.0).to(tl.float32)
    else:
        x = tl.load(ptrs).to(tl.float32)
    if PRE_GELU:
        x = _gelu_tanh(x, INTERPRETED)  # gelu(0) = 0: masked lanes stay neutral for the amax
    return x, cols


@triton.jit
def _store_piece(q_ptr, rows64, row_ok, cols, K, stride_qm, x, low, inv_scale, QMAX: tl.constexpr,
                 IS_FP8: tl.constexpr, ASYM: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr,
                 WIDTH: tl.constexpr, COL_MASK: tl.constexpr, ROW_MASK: tl.constexpr, INTERPRETED: tl.constexpr):
    """Quantize and store one piece (``_store_codes``), masked only where the piece needs it."""
    if COL_MASK or ROW_MASK:
        mask = _piece_mask(rows64, row_ok, cols, K, COL_MASK, ROW_MASK)
    else:
        mask = row_ok  # not read: the store is unmasked
    _store_codes(q_ptr, rows64, cols, mask, stride_qm, x, low, inv_scale, QMAX, IS_FP8, ASYM, CHUNK, ROWS, WIDTH,
                 COL_MASK or ROW_MASK, INTERPRETED)


@triton.jit
def _piece_range(x, cols, K, COL_MASK: tl.constexpr, ASYM: tl.constexpr):
    """Per row: (max, min) of the piece for ASYM, else (max |x|, the same)."""
    if ASYM:
        if COL_MASK:
            valid = (cols < K)[None, :]
            return tl.max(tl.where(valid, x, float("-inf")), axis=1), tl.min(tl.where(valid, x, float("inf")), axis=1)
        return tl.max(x, axis=1), tl.min(x, axis=1)
    amax = tl.max(tl.abs(x), axis=1)
    return amax, amax


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
    ROW_MASK: tl.constexpr,
    P0: tl.constexpr,
    P1: tl.constexpr,
    P2: tl.constexpr,
    P3: tl.constexpr,
    MASK0: tl.constexpr,
    MASK1: tl.constexpr,
    MASK2: tl.constexpr,
    MASK3: tl.constexpr,
    PRE_GELU: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """ROWS whole rows per program, each held in registers as up to four power-of-two pieces P0..P3 (0 = absent;
    MASKi: piece i reaches past K, only ever the last): loaded once, activated once, reduced to the row's range and
    quantized from registers."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)  # 64-bit row offsets: M * K exceeds 2**31 at 10^5 tokens x 13,824 features
    x_rows = rows64 * stride_xm
    x0, c0 = _load_piece(x_ptr, x_rows, row_ok, K, 0, P0, MASK0, ROW_MASK, PRE_GELU, INTERPRETED)
    high, low = _piece_range(x0, c0, K, MASK0, ASYM)
    if P1 > 0:
        x1, c1 = _load_piece(x_ptr, x_rows, row_ok, K, P0, P1, MASK1, ROW_MASK, PRE_GELU, INTERPRETED)
        h1, l1 = _piece_range(x1, c1, K, MASK1, ASYM)
        high, low = tl.maximum(high, h1), tl.minimum(low, l1)
    if P2 > 0:
        x2, c2 = _load_piece(x_ptr, x_rows, row_ok, K, P0 + P1, P2, MASK2, ROW_MASK, PRE_GELU, INTERPRETED)
        h2, l2 = _piece_range(x2, c2, K, MASK2, ASYM)
        high, low = tl.maximum(high, h2), tl.minimum(low, l2)
    if P3 > 0:
        x3, c3 = _load_piece(x_ptr, x_rows, row_ok, K, P0 + P1 + P2, P3, MASK3, ROW_MASK, PRE_GELU, INTERPRETED)
        h3, l3 = _piece_range(x3, c3, K, MASK3, ASYM)
        high, low = tl.maximum(high, h3), tl.minimum(low, l3)
    if ASYM:
        # MSFP: codes 0..QMAX span [row min, row max].
        scale = tl.maximum(high - low, EPS) / QMAX
        tl.store(z_ptr + rows, low, mask=row_ok)
    else:
        scale = tl.maximum(high, EPS) / QMAX
    inv_scale = 1.0 / scale
    _store_piece(q_ptr, rows64, row_ok, c0, K, stride_qm, x0, low, inv_scale, QMAX, IS_FP8, ASYM, CHUNK, ROWS,
                 P0, MASK0, ROW_MASK, INTERPRETED)
    if P1 > 0:
        _store_piece(q_ptr, rows64, row_ok, c1, K, stride_qm, x1, low, inv_scale, QMAX, IS_FP8, ASYM, CHUNK, ROWS,
                     P1, MASK1, ROW_MASK, INTERPRETED)
    if P2 > 0:
        _store_piece(q_ptr, rows64, row_ok, c2, K, stride_qm, x2, low, inv_scale, QMAX, IS_FP8, ASYM, CHUNK, ROWS,
                     P2, MASK2, ROW_MASK, INTERPRETED)
    if P3 > 0:
        _store_piece(q_ptr, rows64, row_ok, c3, K, stride_qm, x3, low, inv_scale, QMAX, IS_FP8, ASYM, CHUNK, ROWS,
                     P3, MASK3, ROW_MASK, INTERPRETED)
    tl.store(s_ptr + rows, scale, mask=row_ok)


MAX_PIECES = 4
MIN_PIECE = 16  # 16 bf16 values: one 32-byte sector per row
ELEMENTS_PER_PROGRAM = 8192  # short rows: whole rows per program up to about this many elements
MAX_VALUES_PER_THREAD = 32  # fp32 values a thread holds: warps are added until a program fits (up to 16)


def row_pieces(k: int) -> tuple[tuple[int, ...], bool]:
    """K as at most MAX_PIECES powers of two, largest first, and whether the last one reaches past K (masked): the
    greedy binary decomposition, its last piece rounded up to a power of two >= MIN_PIECE. K = 8,960 -> 8,192 + 512
    + 256; 1,536 -> 1,024 + 512; 13,824 -> 8,192 + 4,096 + 1,024 + 512; 200 -> 128 + 64 + 16 (masked)."""
    pieces: list[int] = []
    rest = k
    while rest and len(pieces) < MAX_PIECES - 1:
        piece = 1 << (rest.bit_length() - 1)
        if piece < MIN_PIECE:
            break
        pieces.append(piece)
        rest -= piece
    last_masked = False
    if rest:
        piece = max(MIN_PIECE, triton.next_power_of_2(rest))
        pieces.append(piece)
        last_masked = piece != rest
    return tuple(pieces), last_masked


def piece_constexprs(pieces: tuple[int, ...], last_masked: bool) -> dict[str, object]:
    """The kernels' P0..P3 (``row_pieces``' pieces, 0 = absent) and MASK0..MASK3 (piece i reaches past K: only the
    last piece, if ``last_masked``)."""
    padded = (*pieces, *(0,) * (MAX_PIECES - len(pieces)))
    masks = [last_masked and i == len(pieces) - 1 for i in range(MAX_PIECES)]
    return {**{f"P{i}": padded[i] for i in range(MAX_PIECES)}, **{f"MASK{i}": masks[i] for i in range(MAX_PIECES)}}


@dataclass(frozen=True)
class RowLaunch:
    """How ``_act_quant_kernel`` covers an (M, K) input: ``rows`` whole rows per program with ``num_warps`` warps,
    each row split into ``pieces`` (the last masked past K if ``last_masked``); ``row_mask`` when M is not a
    multiple of ``rows``."""

    rows: int
    num_warps: int
    pieces: tuple[int, ...]
    last_masked: bool
    row_mask: bool

    def constexprs(self) -> dict[str, object]:
        return dict(ROWS=self.rows, ROW_MASK=self.row_mask, **piece_constexprs(self.pieces, self.last_masked))

    def describe(self) -> str:
        pieces = " + ".join(map(str, self.pieces)) + (" masked" if self.last_masked else "")
        return f"{self.rows} row(s) of {pieces}, {self.num_warps} warps"


def launch_shape(k: int, m: int) -> RowLaunch:
    """Whole rows per program, about ELEMENTS_PER_PROGRAM elements (one row from 8,192 features on); the fewest of 4,
    8, 16 warps that keep a thread at <= MAX_VALUES_PER_THREAD fp32 values (K = 32,768 on 16 warps holds 64)."""
    pieces, last_masked = row_pieces(k)
    width = sum(pieces)
    rows = max(1, min(64, ELEMENTS_PER_PROGRAM // triton.next_power_of_2(width)))
    num_warps = 4
    while num_warps < 16 and rows * width > num_warps * 32 * MAX_VALUES_PER_THREAD:
        num_warps *= 2
    return RowLaunch(rows, num_warps, pieces, last_masked, m % rows != 0)


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
    launch = launch_shape(k, m)
    _act_quant_kernel[(triton.cdiv(m, launch.rows),)](
        x, codes, scale, scale,  # no zero point in symmetric formats
        m, k, x.stride(0), codes.stride(0),
        QMAX=_QMAX[act_format], IS_FP8=act_format == "fp8_e4m3", ASYM=False, CHUNK=chunk, EPS=_AMAX_EPS,
        PRE_GELU=activation == "gelu_tanh", INTERPRETED=not x.is_cuda, num_warps=launch.num_warps,
        **launch.constexprs(),
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
    launch = launch_shape(k, m)
    _act_quant_kernel[(triton.cdiv(m, launch.rows),)](
        x, codes, scale, zero, m, k, x.stride(0), codes.stride(0),
        QMAX=255.0, IS_FP8=False, ASYM=True, CHUNK=0, EPS=_AMAX_EPS, PRE_GELU=activation == "gelu_tanh",
        INTERPRETED=not x.is_cuda, num_warps=launch.num_warps, **launch.constexprs(),
    )
    return codes, scale, zero
