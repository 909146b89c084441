"""kernels/w4a8_gemm.py vs the exact math of the quantized operands.

The reference of a GEMM on given codes is exact: dequantize both operands in float64 and multiply. The kernel's
products are exact too (8-bit x 4-bit codes on tensor cores), so with an fp32 output it must agree to fp32
accumulation error; with a bf16 output its error vs the float64 result must stay within 2x the error of the torch
implementation of the same math (ops/w4a8_linear.w4a8_linear_reference) - the flash-attention rule.

CPU: TRITON_INTERPRET=1 runs the same kernel source; fp8 tl.dot works in the interpreter, inline PTX does not, so the
CPU runs take the plain-Triton unpack (UNPACK_ASM=False) and the GPU tests compare both unpack paths.
"""

import pytest
import torch

from qsparse_compiler.kernels.act_quant import act_quant
from qsparse_compiler.kernels.w4a8_gemm import GEMM_CONFIGS, supports, w4a8_gemm
from qsparse_compiler.formats.quantization import dequantize_weight_int4, quantize_weight_int4
from qsparse_compiler.ops.w4a8_linear import w4a8_gemm_reference, w4a8_linear_reference


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum().clamp_min(1e-300)))


def exact_reference(codes, scale, pw, bias):
    """float64 result of the quantized operands: what an exact kernel would return before the output cast."""
    a = codes.double() * scale.double()[:, None]
    w = dequantize_weight_int4(pw.qweight.cpu(), pw.scale.cpu(), pw.group_size).double().to(codes.device)
    out = a @ w.t()
    return out if bias is None else out + bias.double()


def run_case(m, n, k, group_size, fmt, dtype, with_bias, device="cpu", unpack_asm=None, config=None):
    x = (torch.randn(m, k, device=device) * 2).to(dtype)
    w = torch.randn(n, k, device=device) * k**-0.5
    bias = (torch.randn(n, device=device) * 0.5).to(dtype) if with_bias else None
    pw = quantize_weight_int4(w, group_size)
    codes, scale = act_quant(x, fmt)
    out = w4a8_gemm(codes, scale, pw.qweight, pw.scale, bias, group_size, dtype, unpack_asm=unpack_asm, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    exact = exact_reference(codes, scale, pw, bias)
    return x, w, bias, pw, out, exact


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize(
    "m,n,k,group_size",
    [(1, 32, 64, 32), (17, 48, 128, 64), (5, 40, 96, 0), (33, 32, 64, 0)],  # single token, tails in M and N
)
def test_fp32_out_is_exact_math_cpu(fmt, m, n, k, group_size):
    _, _, _, _, out, exact = run_case(m, n, k, group_size, fmt, torch.float32, with_bias=True)
    rel = (out.double() - exact).norm() / exact.norm()
    assert rel < 1e-6, f"relative error {rel:.2e} vs the exact quantized math"


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_out_within_2x_of_torch_cpu(fmt, dtype):
    x, _, bias, pw, out, exact = run_case(19, 64, 128, 32, fmt, dtype, with_bias=True)
    # torch's implementation of the same GEMM on the same codes (the act_quant kernel's codes may sit a step away
    # from the reference quantizer's; that is act_quant's test, not this one).
    codes, scale = act_quant(x, fmt)
    torch_out = w4a8_gemm_reference(codes, scale[:, None], pw.qweight, pw.scale, bias, 32, dtype)
    err_kernel = (out.double() - exact).abs().max()
    err_torch = (torch_out.double() - exact).abs().max()
    assert err_kernel <= 2 * err_torch + 1e-12, f"kernel error {err_kernel:.3e} > 2x torch error {err_torch:.3e}"


def test_no_bias_and_per_channel_cpu():
    _, _, _, _, out, exact = run_case(9, 32, 64, 0, "fp8_e4m3", torch.float32, with_bias=False)
    assert sqnr_db(out, exact) > 120


def test_supports_rejects_with_reason():
    codes = torch.zeros(4, 48, dtype=torch.int8)
    pw = quantize_weight_int4(torch.randn(32, 48), 16)
    assert "G % 32" in supports(codes, pw.qweight, pw.scale, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="w4a8_gemm"):
        w4a8_gemm(codes, torch.ones(4), pw.qweight, pw.scale, None, 16, torch.bfloat16)
    assert "fp8_e4m3fn/int8/uint8" in supports(codes.float(), pw.qweight, pw.scale, 16, torch.bfloat16)


def test_configs_are_valid_data():
    for c in GEMM_CONFIGS:
        kw = c.kwargs
        assert kw["BK"] % 32 == 0 and kw["BM"] >= 16 and kw["BN"] >= 16, c
        assert c.num_stages >= 1 and c.num_warps in (4, 8)


# ---- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,unpack_asm", [("fp8_e4m3", True), ("fp8_e4m3", False), ("int8", False)])
@pytest.mark.parametrize("group_size", [128, 0])
@pytest.mark.parametrize("m", [1, 7, 333, 4101])
def test_gpu_vs_quantized_math(fmt, unpack_asm, group_size, m):
    # A pinned tile keeps the compile count down (autotuning itself is exercised by the op tests and the benchmark).
    from qsparse_compiler.kernels.w4a8_gemm import _cfg

    cfg = _cfg(64, 64, 64, 4, 4) if m < 64 else _cfg(128, 128, 128, 8, 4)
    x, w, bias, pw, out, exact = run_case(m, 640, 1536, group_size, fmt, torch.bfloat16, True, "cuda", unpack_asm, cfg)
    assert torch.isfinite(out).all()
    s = sqnr_db(out, exact)
    assert s >= 40, f"SQNR vs the same quantized math {s:.1f} dB < 40"
    torch_out = w4a8_linear_reference(x, pw.qweight, pw.scale, bias, group_size, fmt)
    err_kernel = (out.double() - exact).abs().max()
    err_torch = (torch_out.double() - exact).abs().max()
    assert err_kernel <= 2 * err_torch + 1e-6, f"kernel error {err_kernel:.3e} > 2x torch error {err_torch:.3e}"
    bf16 = torch.nn.functional.linear(x, w.to(x.dtype), bias)
    print(f"\n[quant SQNR vs bf16] {fmt} g{group_size} m={m}: {sqnr_db(out, bf16):.2f} dB (vs exact {s:.1f} dB)")


@pytest.mark.gpu
@pytest.mark.parametrize("idx", range(len(GEMM_CONFIGS)))
def test_gpu_every_config(idx):
    """Each tile config (incl. SWAP_AB) is right, with tails in M and N (M % 4 != 0: misaligned vector loads of
    per-row data would fault); fp8 with the PTX unpack, and int8."""
    cfg = GEMM_CONFIGS[idx]
    fmt = ("fp8_e4m3", "int8")[idx % 2]  # alternate formats: one compile per config keeps the GPU run short
    group = 128 if 128 % cfg.kwargs["BK"] == 0 else 0
    if not (cfg.kwargs["SWAP_AB"] and fmt == "fp8_e4m3"):  # fp8 swap tiles need the split layout (below)
        *_, out, exact = run_case(301, 392, 512, group, fmt, torch.bfloat16, True, "cuda", None, cfg)
        assert sqnr_db(out, exact) >= 40, (fmt, cfg)
    if cfg.kwargs["BK"] == 128:  # and the split code layout, the default of the op for group sizes % 128 == 0
        out, exact = run_split_case(301, 392, 512, group, fmt, "cuda", cfg, torch.bfloat16)
        assert sqnr_db(out, exact) >= 40, ("split", fmt, cfg)


@pytest.mark.gpu
def test_gpu_large_m_headline_shape():
    *_, out, exact = run_case(32760, 8960, 1536, 128, "fp8_e4m3", torch.bfloat16, True, "cuda")
    assert sqnr_db(out, exact) >= 40


def run_split_case(m, n, k, group_size, fmt, device="cpu", config=None, dtype=torch.float32):
    """The A_SPLIT layout: codes written [even k | odd k] per 128 columns, paired with the nibbles in the kernel."""
    from qsparse_compiler.kernels.w4a8_gemm import SPLIT_CHUNK

    x = (torch.randn(m, k, device=device) * 2).to(dtype)
    pw = quantize_weight_int4(torch.randn(n, k, device=device) * k**-0.5, group_size)
    bias = torch.randn(n, device=device).to(dtype)
    codes, scale = act_quant(x, fmt)
    split_codes, split_scale = act_quant(x, fmt, chunk=SPLIT_CHUNK)
    assert torch.equal(split_scale, scale)
    perm = torch.arange(k).reshape(k // SPLIT_CHUNK, SPLIT_CHUNK // 2, 2).transpose(1, 2).reshape(k)
    assert torch.equal(split_codes.view(torch.uint8), codes.view(torch.uint8)[:, perm.to(device)])
    out = w4a8_gemm(split_codes, scale, pw.qweight, pw.scale, bias, group_size, dtype, config=config,
                    a_chunk=SPLIT_CHUNK)
    return out, exact_reference(codes, scale, pw, bias)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("group_size", [128, 0])
def test_split_layout_cpu(fmt, group_size):
    out, exact = run_split_case(5, 40, 256, group_size, fmt)
    assert sqnr_db(out, exact) > 120


def test_fp8_swap_needs_split_layout_cpu():
    from qsparse_compiler.kernels.w4a8_gemm import _cfg

    with pytest.raises(ValueError, match="split code layout"):
        run_case(9, 48, 256, 128, "fp8_e4m3", torch.float32, True, config=_cfg(32, 32, 128, 4, 1, swap=True))


@pytest.mark.parametrize("a_chunk", [0, 128])
def test_swap_ab_cpu(a_chunk):
    """SWAP_AB computes the transposed tile; same numbers (pinned config, since the interpreter autotunes to one)."""
    from qsparse_compiler.kernels.w4a8_gemm import _cfg

    cfg = _cfg(32, 32, 128, 4, 1, swap=True)
    if a_chunk:
        out, exact = run_split_case(9, 48, 256, 128, "fp8_e4m3", config=cfg)
    else:
        *_, out, exact = run_case(9, 48, 256, 128, "int8", torch.float32, True, config=cfg)
    assert sqnr_db(out, exact) > 120


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("m", [1, 333, 4101])
def test_gpu_split_layout(fmt, swap, m):
    from qsparse_compiler.kernels.w4a8_gemm import _cfg

    cfg = _cfg(64 if m < 64 else 128, 128, 128, 4, 3, swap=swap)
    out, exact = run_split_case(m, 640, 1536, 128, fmt, "cuda", cfg, torch.bfloat16)
    assert sqnr_db(out, exact) >= 40


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("group_size", [64, 0])
def test_pre_unpacked_weights_cpu(fmt, group_size):
    """kernels/int4_unpack.py + the GEMM's W_UNPACKED mode compute the same exact math."""
    from qsparse_compiler.kernels.int4_unpack import unpack_int4_to_mma
    from qsparse_compiler.formats.quantization import unpack_int4

    x = torch.randn(11, 128) * 2
    pw = quantize_weight_int4(torch.randn(40, 128) * 0.1, group_size)
    w8 = unpack_int4_to_mma(pw.qweight, fmt)
    q = unpack_int4(pw.qweight).float()
    assert torch.equal(w8.float(), q * 16 if fmt == "int8" else q)
    codes, scale = act_quant(x, fmt)
    out = w4a8_gemm(codes, scale, pw.qweight, pw.scale, None, group_size, torch.float32, w_unpacked=w8)
    assert sqnr_db(out, exact_reference(codes, scale, pw, None)) > 120
    with pytest.raises(ValueError, match="w_unpacked"):
        w4a8_gemm(codes, scale, pw.qweight, pw.scale, None, group_size, torch.float32, w_unpacked=w8[:, :64])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("group_size", [128, 0])
@pytest.mark.parametrize("m", [1, 333, 4101])
def test_gpu_pre_unpacked(fmt, group_size, m):
    from qsparse_compiler.kernels.int4_unpack import unpack_int4_to_mma

    x = (torch.randn(m, 1536, device="cuda") * 2).to(torch.bfloat16)
    pw = quantize_weight_int4(torch.randn(640, 1536, device="cuda") * 0.03, group_size)
    bias = torch.randn(640, device="cuda").to(torch.bfloat16)
    codes, scale = act_quant(x, fmt)
    out = w4a8_gemm(codes, scale, pw.qweight, pw.scale, bias, group_size, torch.bfloat16,
                    w_unpacked=unpack_int4_to_mma(pw.qweight, fmt))
    assert sqnr_db(out, exact_reference(codes, scale, pw, bias)) >= 40


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("pre_unpacked", [False, True])
def test_fp8_rescaled_accumulator_cpu(rescale, pre_unpacked):
    """Grouped fp8: one accumulator rescaled by s[g-1]/s[g] per group == the sum of scaled partials."""
    from qsparse_compiler.kernels.int4_unpack import unpack_int4_to_mma

    x = torch.randn(7, 256) * 2
    w = torch.randn(40, 256) * 0.1
    w[3, 64:128] = 0  # an all-zero group: a tiny scale, ratios of ~1e11 and back
    w[5, :32] *= 100  # and a group with a large scale
    pw = quantize_weight_int4(w, 32)
    codes, scale = act_quant(x, "fp8_e4m3")
    w8 = unpack_int4_to_mma(pw.qweight, "fp8_e4m3") if pre_unpacked else None
    out = w4a8_gemm(codes, scale, pw.qweight, pw.scale, None, 32, torch.float32, rescale=rescale, w_unpacked=w8)
    assert sqnr_db(out, exact_reference(codes, scale, pw, None)) > 100


def test_rescale_rejects_int8_cpu():
    pw = quantize_weight_int4(torch.randn(32, 64), 32)
    codes, scale = act_quant(torch.randn(3, 64), "int8")
    with pytest.raises(ValueError, match="rescale"):
        w4a8_gemm(codes, scale, pw.qweight, pw.scale, None, 32, torch.float32, rescale=True)


@pytest.mark.gpu
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("pre_unpacked", [False, True])
def test_gpu_fp8_rescale(rescale, pre_unpacked):
    from qsparse_compiler.kernels.int4_unpack import unpack_int4_to_mma

    x = (torch.randn(4101, 1536, device="cuda") * 2).to(torch.bfloat16)
    w = torch.randn(640, 1536, device="cuda") * 0.03
    w[3, 128:256] = 0
    pw = quantize_weight_int4(w, 128)
    codes, scale = act_quant(x, "fp8_e4m3")
    w8 = unpack_int4_to_mma(pw.qweight, "fp8_e4m3") if pre_unpacked else None
    out = w4a8_gemm(codes, scale, pw.qweight, pw.scale, None, 128, torch.bfloat16, rescale=rescale, w_unpacked=w8)
    assert sqnr_db(out, exact_reference(codes, scale, pw, None)) >= 40


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 (default mode): output byte i = byte (c >> 4i) & 7 of {b, a}; selector bit 3 = replicate sign."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = src[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def test_unpack_ptx_program_cpu():
    """The inline-PTX int4 -> e4m3 unpack (GPU only) run through a prmt/and/shr/or emulator on every byte value:
    the CPU interpreter cannot execute inline asm, so this checks its table constants and selector logic."""
    import re

    from qsparse_compiler.kernels.w4a8_gemm import _UNPACK_FP8_ASM

    program = str(_UNPACK_FP8_ASM.value if hasattr(_UNPACK_FP8_ASM, "value") else _UNPACK_FP8_ASM)

    def run(word: int) -> tuple[int, int]:
        regs = {"$2": word}
        val = lambda t: int(t, 16) if t.startswith("0x") else int(t) if t.isdigit() else regs[t]  # noqa: E731
        for line in program.splitlines():
            m = re.match(r"\s*(mov|and|or|shr|prmt)\.\w+(?:\.\w+)?\s+([^;]+);", line)
            if not m:
                continue
            op, args = m.group(1), [t.strip() for t in m.group(2).split(",")]
            x = [val(t) for t in args[1:]]
            regs[args[0]] = {
                "mov": lambda: x[0], "and": lambda: x[0] & x[1], "or": lambda: x[0] | x[1],
                "shr": lambda: x[0] >> x[1], "prmt": lambda: _prmt(*x),
            }[op]() & 0xFFFFFFFF
        return regs["$0"], regs["$1"]

    codes = torch.arange(256, dtype=torch.int64)
    lo_q = ((codes & 0xF) ^ 8) - 8
    hi_q = ((codes >> 4) ^ 8) - 8
    for start in range(0, 256, 4):
        word = sum(int(codes[start + j]) << (8 * j) for j in range(4))
        lo, hi = run(word)
        got_lo = torch.tensor([(lo >> (8 * j)) & 0xFF for j in range(4)], dtype=torch.uint8).view(torch.float8_e4m3fn)
        got_hi = torch.tensor([(hi >> (8 * j)) & 0xFF for j in range(4)], dtype=torch.uint8).view(torch.float8_e4m3fn)
        assert torch.equal(got_lo.float(), lo_q[start:start + 4].float()), start
        assert torch.equal(got_hi.float(), hi_q[start:start + 4].float()), start
