import copy
import json
import math

import pytest
import torch

from qsparse_compiler.formats.layout import BlockSparseLayout
from qsparse_compiler.formats.patterns import TokenGrid, local_3d
from qsparse_compiler.eval.fidelity import (
    attention_recall,
    capture_attention_qk,
    evaluate,
    layer_sqnr,
    psnr,
    random_wan_inputs,
    sqnr_db,
    ssim,
)
from qsparse_compiler.eval.reference_model import TINY_MODEL_CONFIG, build_reference_model
from qsparse_compiler.eval.synthetic_video import SyntheticVideoConfig, SyntheticVideos


def _videos(n: int = 2) -> torch.Tensor:
    return SyntheticVideos(SyntheticVideoConfig(frames=4, height=32, width=32)).batch(n, seed=1)[0]


# ---------------------------------------------------------------- video metrics
def test_identical_videos_inf_psnr_and_unit_ssim():
    v = _videos()
    assert torch.isinf(psnr(v, v)).all()
    assert torch.equal(ssim(v, v), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2])
def test_gaussian_noise_gives_expected_psnr(sigma):
    v = torch.zeros(2, 3, 8, 64, 64)  # noise without clipping: MSE = sigma^2 in expectation
    noisy = v + sigma * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
    expected = 10 * math.log10(2.0**2 / sigma**2)
    got = psnr(v, noisy)
    # 98k samples per video: the sample MSE is within ~1% of sigma^2, i.e. ~0.04 dB.
    assert got.shape == (2,) and torch.allclose(got, torch.full((2,), expected, dtype=torch.float64), atol=0.1)


def test_ssim_falls_with_noise_and_handles_images():
    v = _videos()
    gen = torch.Generator().manual_seed(0)
    values = [float(ssim(v, (v + s * torch.randn(v.shape, generator=gen)).clamp(-1, 1)).mean()) for s in (0.02, 0.1, 0.4)]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    img = v[:, :, 0]
    assert torch.allclose(ssim(img, img), torch.ones(2, dtype=torch.float64))


def test_ssim_of_constant_frames_matches_closed_form():
    # Constant frames have zero variance, so SSIM is the luminance term alone: (2ab + C1) / (a^2 + b^2 + C1).
    a, b = torch.full((1, 1, 1, 16, 16), 0.2), torch.full((1, 1, 1, 16, 16), -0.3)
    c1 = (0.01 * 2.0) ** 2
    assert float(ssim(a, b)) == pytest.approx((2 * 0.2 * -0.3 + c1) / (0.2**2 + 0.3**2 + c1), rel=1e-6)  # inputs are float32


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 4))
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_video_metrics_are_torchmetrics_per_frame():
    import torchmetrics.functional as tm

    v = _videos()
    noisy = (v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    frames = lambda x: x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # noqa: E731  [N*T, C, H, W]
    ref_ssim = tm.structural_similarity_index_measure(frames(noisy).double(), frames(v).double(), data_range=2.0)
    assert float(ssim(v, noisy).mean()) == pytest.approx(float(ref_ssim), abs=1e-6)
    for i in range(2):
        ref_psnr = tm.peak_signal_noise_ratio(noisy[i].double(), v[i].double(), data_range=2.0)
        assert float(psnr(v, noisy)[i]) == pytest.approx(float(ref_psnr), abs=1e-4)  # torchmetrics keeps data_range in fp32


def test_sqnr_db_known_ratio():
    ref = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    noise = noise * (ref.norm() / noise.norm()) * 0.01  # noise power = signal power / 10^4 exactly
    assert sqnr_db(ref + noise, ref) == pytest.approx(40.0, abs=1e-4)
    assert sqnr_db(ref.clone(), ref) == math.inf


# ---------------------------------------------------------------- per-layer SQNR
def _tiny_inputs():
    return {
        "hidden_states": torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1)),
    }


def test_layer_sqnr_locates_the_perturbed_block():
    dense = build_reference_model(TINY_MODEL_CONFIG, seed=0).eval()
    variant = copy.deepcopy(dense)
    with torch.no_grad():
        w = variant.blocks[1].ffn.net[2].weight
        w.add_(0.01 * w.abs().mean() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    result = layer_sqnr(dense, variant, _tiny_inputs())
    assert set(result) == {"blocks.0", "blocks.1", "output"}
    assert result["blocks.0"] == math.inf  # before the perturbation: bit-identical
    assert 20.0 < result["blocks.1"] < math.inf and math.isfinite(result["output"])
    same = layer_sqnr(dense, copy.deepcopy(dense), _tiny_inputs())
    assert all(v == math.inf for v in same.values())


def test_random_wan_inputs_fit_the_model():
    model = build_reference_model(TINY_MODEL_CONFIG, seed=0).eval()
    inputs = random_wan_inputs(model, frames=2, height=8, width=8, text_len=5, batch=2, seed=3)
    assert inputs["hidden_states"].shape == (2, 3, 2, 8, 8) and inputs["encoder_hidden_states"].shape == (2, 5, 64)
    assert torch.equal(inputs["hidden_states"], random_wan_inputs(model, frames=2, height=8, width=8, text_len=5, batch=2, seed=3)["hidden_states"])
    with torch.no_grad():
        assert model(**inputs, return_dict=False)[0].shape == (2, 3, 2, 8, 8)


def test_layer_sqnr_hooks_see_a_compiled_variant():
    dense = build_reference_model(TINY_MODEL_CONFIG, seed=0).eval()
    variant = copy.deepcopy(dense)
    with torch.no_grad():
        variant.blocks[0].attn1.to_v.weight.mul_(1.01)
    eager = layer_sqnr(dense, variant, _tiny_inputs())
    compiled = layer_sqnr(dense, torch.compile(variant, backend="eager"), _tiny_inputs())
    assert math.isfinite(compiled["blocks.0"])
    for key in eager:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3)


# ---------------------------------------------------------------- attention recall
def _exact_recall(q, k, layout):
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
    return (p * layout.to_token_mask().double()).sum(-1)  # [B, H, Sq]


@pytest.mark.parametrize("sq,skv", [(64, 64), (70, 50)])  # the second has tail blocks on both axes
def test_attention_recall_matches_masked_softmax(sq, skv):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, sq, 16, generator=g) * 2, torch.randn(2, 3, skv, 16, generator=g) * 2
    bitmap = torch.rand(2, 3, -(-sq // 16), -(-skv // 16), generator=g) < 0.4
    bitmap[..., 0] = True
    layout = BlockSparseLayout.from_bitmap(bitmap, 16, 16, sq, skv)
    exact = _exact_recall(q, k, layout)
    got = attention_recall(q, k, layout)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), exact.mean(-1), rtol=1e-5, atol=1e-6)
    # Chunking (one query block per chunk) gives the same answer.
    torch.testing.assert_close(attention_recall(q, k, layout, max_chunk_bytes=1), got, rtol=1e-6, atol=1e-6)
    per_block = attention_recall(q, k, layout, per_query_block=True)
    assert per_block.shape == (2, 3, layout.shape[2])
    last = exact[..., (layout.shape[2] - 1) * 16 :].mean(-1)
    torch.testing.assert_close(per_block[..., -1].double(), last, rtol=1e-5, atol=1e-6)


def test_attention_recall_full_empty_and_broadcast_layouts():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 48, 8, generator=g), torch.randn(1, 2, 48, 8, generator=g)
    full = BlockSparseLayout.from_bitmap(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 16, 48, 48)
    torch.testing.assert_close(attention_recall(q, k, full), torch.ones(1, 2))
    empty = BlockSparseLayout.from_bitmap(torch.zeros(1, 1, 3, 3, dtype=torch.bool), 16, 16, 48, 48)
    assert float(attention_recall(q, k, empty).abs().max()) == 0.0
    with pytest.raises(ValueError, match="build the layout for this sequence"):
        attention_recall(q[:, :, :40], k, full)


def test_recall_of_a_3d_local_pattern_on_captured_attention():
    model = build_reference_model(TINY_MODEL_CONFIG, seed=0).eval()
    inputs = {**_tiny_inputs(), "hidden_states": torch.randn(1, 3, 4, 16, 16)}
    import diffusers.models.transformers.transformer_wan as wan

    dispatch_before = wan.dispatch_attention_fn
    captured = capture_attention_qk(model, inputs)
    assert wan.dispatch_attention_fn is dispatch_before  # patched only inside the call
    assert set(captured) == {"blocks.0.attn1", "blocks.1.attn1"}
    q, k = captured["blocks.0.attn1"]
    assert q.shape == (1, TINY_MODEL_CONFIG["num_attention_heads"], 4 * 8 * 8, TINY_MODEL_CONFIG["attention_head_dim"])
    # The captured q, k reproduce the layer's attention: SDPA on them equals the dense softmax we integrate.
    layout = BlockSparseLayout.from_bitmap(local_3d(TokenGrid(4, 8, 8, 256), 32, 32, 0.25)[None, None], 32, 32, 256, 256)
    recall = attention_recall(q, k, layout)
    torch.testing.assert_close(recall.double(), _exact_recall(q, k, layout).mean(-1), rtol=1e-5, atol=1e-6)
    assert bool(((recall > 0) & (recall < 1)).all())


# ---------------------------------------------------------------- harness
def test_evaluate_writes_reports(tmp_path):
    data = SyntheticVideoConfig(frames=2, height=16, width=16)

    def perturb(m):
        with torch.no_grad():
            for lin in (x for x in m.modules() if isinstance(x, torch.nn.Linear)):
                lin.weight.add_(1e-2 * torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(0)))
        return m

    result = evaluate(
        {"identity": lambda m: m, "perturbed": perturb},
        out_dir=tmp_path,
        model_factory=lambda: build_reference_model(TINY_MODEL_CONFIG, seed=0).eval(),
        seeds=[0, 1],
        num_steps=2,
        data=data,
    )
    assert result.variants["identity"].psnr_mean == math.inf and result.variants["identity"].ssim_mean == 1.0
    pert = result.variants["perturbed"]
    assert math.isfinite(pert.psnr_mean) and pert.ssim_mean < 1.0 and len(pert.psnr_db) == 2
    assert set(pert.layer_sqnr_db) == {"blocks.0", "blocks.1", "output"}
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["variants"]["identity"]["psnr_mean"] == "inf" and written["settings"]["seeds"] == [0, 1]
    table = (tmp_path / "results.md").read_text()
    assert "| perturbed |" in table and "| identity | inf |" in table
    assert pert.notes == []
    for name in ("psnr.png", "layer_sqnr.png", "videos.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_evaluate_variant_without_blocks_gets_a_note():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    data = SyntheticVideoConfig(frames=2, height=8, width=8)
    result = evaluate(
        {"wrapped": Wrapper},
        model_factory=lambda: build_reference_model(TINY_MODEL_CONFIG, seed=0).eval(),
        seeds=[0],
        num_steps=1,
        data=data,
    )
    r = result.variants["wrapped"]
    assert r.psnr_mean == math.inf and r.layer_sqnr_db == {} and "no per-block SQNR" in r.notes[0]
    assert "- wrapped: no per-block SQNR" in result.markdown()
