"""An attention mask built as p_i & p_j from a key-padding mask p (HunyuanVideo 1.5's processor) is rewritten to the
sparse op with p as its key-padding mask and the padded query rows zeroed (sparsify_attention._pair_padding):
with every tile kept it computes exactly what SDPA does, all-masked rows included."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from qsparse_compiler.compiler.backend import clear_reports, quantsparse, reports


class PairMaskedDiT(nn.Module):
    def __init__(self, dim=128, heads=2):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList([nn.ModuleList([nn.Linear(dim, dim) for _ in range(3)])])

    def forward(self, hidden_states, valid, num_frames: int, height: int, width: int):
        q, k, v = (proj(hidden_states).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in self.blocks[0])
        batch, seq = valid.shape
        rows = valid.bool().view(batch, 1, 1, seq).repeat(1, 1, seq, 1)
        mask = (rows & rows.transpose(2, 3)).bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_pair_mask_becomes_a_key_padding_mask_with_zeroed_rows():
    torch.manual_seed(0)
    model = PairMaskedDiT().eval()
    x, valid = torch.randn(2, 128, 128), torch.ones(2, 128, dtype=torch.bool)
    valid[1, 100:] = False  # the second sample's last 28 tokens are padding
    options = {"quant": {"enabled": False}, "sparsity": {"pattern": "dense", "block_q": 64, "block_kv": 64}}
    torch._dynamo.reset()
    clear_reports()
    backend = functools.partial(quantsparse, compile_graph=lambda gm, _: gm)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, options=options)(x, valid, num_frames=2, height=8, width=8)
        expected = model(x, valid, num_frames=2, height=8, width=8)
    (report,) = reports()
    (site,) = [site for site in report.sites if site.kind == "self_attention"]
    assert site.action == "sparse_attention", site.reason
    torch.testing.assert_close(out, expected)
    assert not out[1, :, 100:].any()  # padded queries attend nothing: zero rows, as SDPA gives
