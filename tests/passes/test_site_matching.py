"""Pattern matching without Inductor: which sites the passes rewrite, and which they must leave alone (and why)."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from qsparse_compiler.config import QuantSparseConfig
from qsparse_compiler.compiler.passes import PassContext, default_passes, run_passes
from qsparse_compiler.compiler.passes.graph_utils import normalize_path
from qsparse_compiler.compiler.passes.report import RewriteReport
from qsparse_compiler.eval.capture import capture_dynamo_graph, rewrite_with_default_passes
from qsparse_compiler.eval.models import TEST_OPTIONS, ToyVideoDiT, tiny_cogvideox, tiny_hunyuan, tiny_wan


def rewrite(model, inputs, options=TEST_OPTIONS):
    return rewrite_with_default_passes(model, inputs, options)


def toy_inputs():
    return {"x": torch.randn(1, 4, 3, 16, 16)}


def test_plain_video_attention_and_block_linears_are_rewritten():
    _, sites, _ = rewrite(ToyVideoDiT(), toy_inputs())
    assert sites["blocks.0"].action == "sparse_attention"
    assert sites["blocks.0"].kind == "self_attention"
    for name in ("to_q", "to_k", "to_v", "to_out"):
        assert sites[f"blocks.0.{name}"].action == "w4a8_linear"
    assert counters["qsparse"]["w4a8_linear"] == 4


@pytest.mark.parametrize(
    "variant, reason",
    [
        ("dense_mask", "not a boolean key-padding mask"),
        ("dropout", "dropout_p=0.1"),
        ("causal", "causal attention"),
        ("gqa", "grouped-query attention (q heads 2, kv heads 1)"),
        ("broadcast_kv", "grouped-query attention (q heads 2, kv heads 1)"),
    ],
)
def test_attention_variants_are_left_alone_with_a_reason(variant, reason):
    model = ToyVideoDiT(variant)
    inputs = toy_inputs()
    options = {**TEST_OPTIONS, "quant": {"enabled": False}}
    gm, sites, ctx = rewrite(model, inputs, options)
    assert sites["blocks.0"].action == "kept"
    assert reason in sites["blocks.0"].reason
    assert counters["qsparse"]["sparse_attention"] == 0
    # The rewritten graph still computes exactly what eager does.
    with torch.no_grad():
        torch.manual_seed(0)
        actual = gm(*ctx.example_inputs)[0]
        torch.manual_seed(0)
        assert torch.allclose(actual, model(**inputs))


def test_linears_outside_blocks_or_with_computed_weights_are_kept():
    _, sites, ctx = rewrite(ToyVideoDiT(), toy_inputs())
    assert sites["head"].action == "kept" and "outside the transformer blocks" in sites["head"].reason
    computed = [s for s in ctx.report.sites if s.kind == "linear" and "computed in the graph" in s.reason]
    assert len(computed) == 1


def test_k_not_multiple_of_group_is_kept():
    _, sites, _ = rewrite(ToyVideoDiT(dim=48), toy_inputs(), {**TEST_OPTIONS, "quant": {"group_size": 32}})
    assert sites["blocks.0.to_q"].action == "kept"
    assert "not a multiple of group_size=32" in sites["blocks.0.to_q"].reason


def test_wan_cross_attention_and_head_are_not_rewritten():
    tiny = tiny_wan(num_layers=1)
    _, sites, ctx = rewrite(tiny.model, tiny.make_inputs())
    assert sites["blocks.0.attn1"].kind == "self_attention" and sites["blocks.0.attn1"].action == "sparse_attention"
    assert sites["blocks.0.attn2"].kind == "cross_attention" and sites["blocks.0.attn2"].action == "kept"
    assert sites["proj_out"].action == "kept"
    assert sites["condition_embedder.time_proj"].action == "kept"
    grid = ctx.analysis["grid"]
    assert (grid.frames, grid.height, grid.width) == (3, 8, 8)


def test_per_head_pattern_is_sliced_to_the_heads_of_a_ulysses_rank():
    """A 2-head graph as rank 1 of 2 sees it in a 4-head model: pattern entries 2 and 3; without the parallel option
    the 4 entries do not fit 2 heads and the site stays dense with the fix in the reason."""
    tiny = tiny_wan(num_layers=1)
    sparsity = {**TEST_OPTIONS["sparsity"], "pattern": "local3d:0.3;dense;stripe:0.5;multidiag:0.4"}
    _, sites, _ = rewrite(tiny.model, tiny.make_inputs(), {**TEST_OPTIONS, "sparsity": sparsity,
                                                           "parallel": {"ulysses_degree": 2, "ulysses_rank": 1}})
    assert sites["blocks.0.attn1"].action == "sparse_attention"
    assert sites["blocks.0.attn1"].reason.startswith("stripe:0.5;multidiag:0.4 @")
    assert sites["blocks.0.attn1"].reason.endswith("heads 2..3 of 4 (Ulysses rank 1 of 2)")
    _, sites, _ = rewrite(tiny.model, tiny.make_inputs(), {**TEST_OPTIONS, "sparsity": sparsity})
    assert sites["blocks.0.attn1"].action == "kept"
    assert "4 head patterns for 2 heads - if the heads are split across 2 ranks" in sites["blocks.0.attn1"].reason


def test_diffusers_hook_detours_name_the_module_itself():
    # Wan's first block under context parallelism: its forward is wrapped by diffusers' split hook.
    regional = "L['function_reference'].forward.__self__._modules['attn1']._modules['to_q']._parameters['weight']"
    assert normalize_path(regional) == "attn1.to_q.weight"
    wrapper = ".forward.func.__closure__[0].cell_contents"
    whole = f"L['self']._modules['blocks']._modules['0']{wrapper}{wrapper}.forward.__self__._modules['attn1']"
    assert normalize_path(whole) == "blocks.0.attn1"


def test_hunyuan_joint_attention_conditioning_and_refiner():
    tiny = tiny_hunyuan()
    _, sites, _ = rewrite(tiny.model, tiny.make_inputs())
    double, single = sites["transformer_blocks.0.attn"], sites["single_transformer_blocks.0.attn"]
    assert double.kind == single.kind == "joint_attention"
    assert double.action == single.action == "sparse_attention"
    assert double.details["video_start"] == "0"  # video first, then text
    refiner = sites["context_embedder.token_refiner.refiner_blocks.0.attn"]
    assert refiner.kind == "text_attention" and refiner.action == "kept"
    modulation = sites["transformer_blocks.0.norm1.linear"]
    assert modulation.action == "kept" and "conditioning linear" in modulation.reason


def test_cogvideox_text_first_joint_attention():
    tiny = tiny_cogvideox(num_layers=1)
    _, sites, ctx = rewrite(tiny.model, tiny.make_inputs())
    attention = sites["transformer_blocks.0.attn1"]
    assert attention.kind == "joint_attention" and attention.action == "sparse_attention"
    assert attention.details["video_start"] == "8"  # 8 text tokens come first
    grid = ctx.analysis["grid"]
    assert (grid.frames, grid.height, grid.width) == (3, 8, 8)


class InPlaceToyDiT(ToyVideoDiT):
    """In-place mutations whose results nobody reads, as CogVideoX writes its positional embedding into a slice."""

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        pos = h.new_zeros(h.shape)
        pos[:, 8:].copy_(h[:, :-8])
        torch.relu_(pos)
        h.mul_(0.5)
        for block in self.blocks:
            h = h + block(h + pos)
        return self.head(h)


def test_in_place_mutations_survive_the_rewrite():
    """Dead-code elimination after a rewrite must keep mutations: FX's default drops `x.copy_(y)` whose result is
    unused, and the graph then computes something else than the model (CogVideoX at a new frame count did)."""
    model, inputs = InPlaceToyDiT(), toy_inputs()
    options = {"quant": {"enabled": False}, "sparsity": {"density": 1.0, "block_q": 16, "block_kv": 16}}
    gm, sites, ctx = rewrite(model, inputs, options)
    assert sites["blocks.0"].action == "sparse_attention"  # a rewrite happened, so dead code was eliminated
    assert all(name in gm.code for name in (".copy_(", "torch.relu_(", ".mul_("))
    with torch.no_grad():
        assert torch.allclose(gm(*ctx.example_inputs)[0], model(**inputs), atol=1e-5)


class TorchAttentionModel(nn.Module):
    """nn.MultiheadAttention, then an nn.TransformerEncoder (its inference fast path): torch's fused attention."""

    def __init__(self, dim=64):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        y, _ = self.mha(x, x, x, need_weights=False)
        return self.encoder(y)


def test_fused_torch_attention_is_reported_with_a_reason():
    """torch's fused attention calls hold their projections: not rewritten, but in the report like every site."""
    _, sites, _ = rewrite(TorchAttentionModel().eval(), {"x": torch.randn(2, 5, 64)})
    fused = {fqn: site for fqn, site in sites.items() if site.kind == "fused_attention"}
    assert sorted(fused) == ["encoder.layers.0", "mha"]
    assert "multi_head_attention_forward" in fused["mha"].reason
    assert "_transformer_encoder_layer_fwd" in fused["encoder.layers.0"].reason
    assert all(site.action == "kept" for site in fused.values())


def test_plain_mlp_is_untouched_and_reported():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    _, sites, ctx = rewrite(model, {"input": torch.randn(2, 5, 64)})
    assert all(site.action == "kept" for site in sites.values()) and len(sites) == 2
    assert any("no video token grid" in note for note in ctx.report.notes)


def test_training_graph_is_left_alone():
    model = ToyVideoDiT().train()
    counters.clear()
    gm, example_inputs = capture_dynamo_graph(model, toy_inputs())
    ctx = PassContext(QuantSparseConfig.from_options(TEST_OPTIONS), example_inputs, RewriteReport(0))
    run_passes(gm, ctx, default_passes())
    assert counters["qsparse"]["w4a8_linear"] == 0 and counters["qsparse"]["sparse_attention"] == 0
    reasons = {s.fqn: s.reason for s in ctx.report.sites if s.fqn.startswith("blocks.0.to_")}
    assert len(reasons) == 4 and all("autograd" in reason for reason in reasons.values())
    attention = [s for s in ctx.report.sites if s.kind == "self_attention"]
    assert "autograd" in attention[0].reason


def test_layouts_are_recorded_for_building_before_the_graph_runs():
    """Every static layout the graph asks for is known to the backend, which builds it before the graph runs (on CUDA:
    outside any CUDA-graph memory pool) under the key the op looks up."""
    from qsparse_compiler.compiler.backend import _RuntimeInputs
    from qsparse_compiler.ops.video_layout import _cached_layouts

    tiny = tiny_wan(num_layers=2)
    with torch.no_grad():
        gm, example_inputs = capture_dynamo_graph(tiny.model, tiny.make_inputs())
        ctx = PassContext(QuantSparseConfig.from_options(TEST_OPTIONS), example_inputs, RewriteReport(0))
        gm = run_passes(gm, ctx, default_passes())
    assert len(ctx.layout_slots) == tiny.video_attentions == 2
    slot = ctx.layout_slots[0]
    assert slot.grid != (0, 0, 0) and slot.seq_len == slot.grid[0] * slot.grid[1] * slot.grid[2]
    _cached_layouts.cache_clear()
    wrapper = object.__new__(_RuntimeInputs)  # only its layout step: the slots of a CPU graph stand in for CUDA ones
    wrapper.layout_slots = ctx.layout_slots
    wrapper._build_layouts()
    assert _cached_layouts.cache_info().misses == 1  # both blocks share one layout
    with torch.no_grad():
        gm(*example_inputs, *ctx.extra_example_inputs)
    assert _cached_layouts.cache_info().misses == 1  # the graph's op found it built
