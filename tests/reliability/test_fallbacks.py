"""What the passes do not rewrite, end to end through torch.compile(backend="quantsparse"): attention variants, odd
and tiny layers, training graphs, models that are not video DiTs. Each compiles, runs like eager, and every site it
skips is in the rewrite report with its reason (tests/passes/test_site_matching.py checks the same sites without
Inductor)."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qsparse_compiler.compiler.backend import clear_reports, reports
from qsparse_compiler.eval.capture import rewritten_reference_output
from qsparse_compiler.eval.metrics import relative_error, sqnr_db
from qsparse_compiler.eval.models import EXACT_OPTIONS, TEST_OPTIONS, ToyVideoDiT, tiny_wan

pytestmark = pytest.mark.slow

# Dropout under Inductor draws from eager's RNG only with fallback_random: then one seed gives both the same mask.
SAME_RNG = {"inductor": {"fallback_random": True}}


def compile_and_run(model, inputs, options):
    """(compiled output, the same rewrite on the plain-torch op references, eager output, the graph's rewrite report
    by FQN), each run from the same RNG seed."""
    unfused = rewritten_reference_output(model, inputs, options)
    torch._dynamo.reset()
    clear_reports()
    compiled = torch.compile(model, backend="quantsparse", options=options, fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(0)
        out = compiled(**inputs)
        torch.manual_seed(0)
        expected = model(**inputs)
    (report,) = reports()
    assert all(site.reason for site in report.kept()), [site.fqn for site in report.kept() if not site.reason]
    return out, unfused, expected, {site.fqn: site for site in report.sites}


def assert_runs_like_its_quantized_reference(out, unfused, expected):
    """Inductor's run equals the plain-torch run of the same rewrite (measured 129-140 dB on CPU: the same codes, fp32
    accumulation order aside), and that rewrite is a W4A8 approximation of eager (21-46 dB over 12 seeds), not a
    broken one."""
    assert sqnr_db(out, unfused) >= 60, sqnr_db(out, unfused)
    assert sqnr_db(unfused, expected) >= 10, sqnr_db(unfused, expected)


def video(frames=3, size=16):
    return {"x": torch.randn(1, 4, frames, size, size)}


@pytest.mark.parametrize("quantize", [False, True], ids=["exact", "w4a8"])
@pytest.mark.parametrize("variant, reason", [
    ("dense_mask", "is not a boolean key-padding mask"),
    ("dropout", "dropout_p=0.1"),
    ("causal", "causal attention"),
    ("gqa", "grouped-query attention (q heads 2, kv heads 1)"),
    ("broadcast_kv", "grouped-query attention (q heads 2, kv heads 1)"),
])
def test_attention_variants_stay_sdpa_and_run_like_eager(variant, reason, quantize):
    options = {**(TEST_OPTIONS if quantize else {**TEST_OPTIONS, "quant": {"enabled": False}}), **SAME_RNG}
    out, unfused, expected, sites = compile_and_run(ToyVideoDiT(variant), video(), options)
    assert sites["blocks.0"].action == "kept" and reason in sites["blocks.0"].reason
    linears = [sites[f"blocks.0.{name}"].action for name in ("to_q", "to_k", "to_v", "to_out")]
    if quantize:  # the rest of the block is still rewritten
        assert linears == ["w4a8_linear"] * 4
        assert_runs_like_its_quantized_reference(out, unfused, expected)
    else:
        assert relative_error(out, expected) < 1e-5


class OddWidthDiT(nn.Module):
    """A video DiT whose block linears have odd K (33, 35): no group size divides them."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv3d(4, 33, (1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(33, 35), nn.GELU(), nn.Linear(35, 33))])
        self.head = nn.Linear(33, 4)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@pytest.mark.parametrize("model, inputs, options, expected, exact", [
    pytest.param(lambda: ToyVideoDiT(dim=48), video, {**EXACT_OPTIONS, "quant": {"group_size": 32}},
                 {"blocks.0.to_q": ("kept", "in_features=48 is not a multiple of group_size=32"),
                  "blocks.0": ("sparse_attention", "")}, True, id="K=48-group32"),
    pytest.param(OddWidthDiT, video, {**EXACT_OPTIONS, "quant": {"group_size": 0}},
                 {"blocks.0.0": ("kept", "in_features=33 is odd"), "blocks.0.2": ("kept", "in_features=35 is odd")}, True,
                 id="odd-K-per-channel"),
    pytest.param(ToyVideoDiT, lambda: video(frames=1, size=4), TEST_OPTIONS,
                 {"blocks.0": ("kept", "S=4 fits in one query block (block_q=16): nothing to skip"),
                  "blocks.0.to_q": ("w4a8_linear", "")}, False, id="4-token-video"),
])
def test_odd_and_tiny_layers_run_like_eager(model, inputs, options, expected, exact):
    out, unfused, reference, sites = compile_and_run(model(), inputs(), options)
    for fqn, (action, reason) in expected.items():
        assert sites[fqn].action == action and reason in sites[fqn].reason, (fqn, sites[fqn])
    if exact:
        assert relative_error(out, reference) < 1e-5
    else:
        assert_runs_like_its_quantized_reference(out, unfused, reference)


def test_training_graphs_are_not_rewritten_and_backprop_like_eager():
    """Grad enabled, parameters requiring grad, train mode: the graph keeps its own ops (qsparse ops have no
    backward), a warning says so, and forward and gradients equal eager's."""
    tiny = tiny_wan(num_layers=1)
    model, inputs = tiny.model.train(), tiny.make_inputs()
    torch._dynamo.reset()
    clear_reports()
    compiled = torch.compile(model, backend="quantsparse", options=TEST_OPTIONS, fullgraph=True)
    with pytest.warns(UserWarning, match="autograd enabled; nothing was rewritten"):
        out = compiled(**inputs)[0]
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = model(**inputs)[0]
    expected.square().mean().backward()
    assert relative_error(out, expected) < 1e-5
    assert all(relative_error(grads[name], p.grad) < 1e-4 for name, p in model.named_parameters())
    (report,) = reports()
    block_sites = [site for site in report.sites if site.fqn.startswith("blocks.0.") and site.kind != "cross_attention"]
    assert len(block_sites) == tiny.block_linears + tiny.video_attentions
    assert all(site.action == "kept" and site.reason.startswith("autograd") for site in block_sites)


class EncoderBlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock: pre-norm nn.MultiheadAttention and an MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer at toy size, with its module names (encoder.layers.encoder_layer_N)."""

    def __init__(self, dim=64, heads=2, layers=2, patch=4, image=16, classes=10):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.encoder.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, heads)) for i in range(layers)))
        self.encoder.ln = nn.LayerNorm(dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.encoder.pos_embedding
        return self.heads(self.encoder.ln(self.encoder.layers(x))[:, 0])


class SdpaBlock(nn.Module):
    """timm's ViT block: qkv linear, F.scaled_dot_product_attention, projection, MLP."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SdpaViT(nn.Module):
    def __init__(self, dim=64, heads=2, layers=2, patch=4, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.ModuleList([SdpaBlock(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_torchvision_style_vit_compiles_untouched_with_its_attention_reported():
    model = TorchvisionViT().eval()
    out, _, expected, sites = compile_and_run(model, {"x": torch.randn(2, 3, 16, 16)}, TEST_OPTIONS)
    assert relative_error(out, expected) < 1e-5
    fused = [fqn for fqn, site in sites.items() if site.kind == "fused_attention"]
    assert fused == ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"]
    # Not under a top-level ModuleList, so QuantConfig.site_pattern calls none of its linears a block linear.
    linears = [site for site in sites.values() if site.kind == "linear"]
    assert len(linears) == 5 and all("outside the transformer blocks" in site.reason for site in linears)
    assert all(site.action == "kept" for site in sites.values())
    assert any("no video token grid" in note for note in reports()[0].notes)


def test_sdpa_vit_has_its_block_linears_quantized_and_its_attention_kept():
    model = SdpaViT().eval()
    out, unfused, expected, sites = compile_and_run(model, {"x": torch.randn(2, 3, 16, 16)}, TEST_OPTIONS)
    attention = [site for site in sites.values() if site.kind == "attention"]
    assert len(attention) == 2 and all(site.reason == "no video token grid in this graph" for site in attention)
    assert all(site.action == "kept" for site in attention)
    assert sum(site.action == "w4a8_linear" for site in sites.values()) == 8  # qkv, proj, fc1, fc2 per block
    assert sites["head"].action == "kept"
    assert torch.isfinite(out).all()
    assert_runs_like_its_quantized_reference(out, unfused, expected)


def test_plain_mlp_compiles_untouched():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    out, _, expected, sites = compile_and_run(model, {"input": torch.randn(2, 5, 64)}, TEST_OPTIONS)
    assert sorted(sites) == ["0", "2"] and all(site.action == "kept" for site in sites.values())
    assert relative_error(out, expected) < 1e-6
