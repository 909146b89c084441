"""Timestep-aware LoRA: buckets, per-row corrections, the no-op start, the timestep taken from the model call."""

import torch

from qsparse_compiler.calibration.lora import TimestepLoRA, TimestepState, bucket_index, lora_delta, timestep_hook
from qsparse_compiler.eval.models import tiny_cogvideox, tiny_wan


def test_bucket_index_counts_edges_at_or_below_the_timestep():
    edges = (250.0, 500.0, 750.0)
    assert bucket_index(torch.tensor([0, 249, 250, 999]), edges).tolist() == [0, 0, 1, 3]
    assert bucket_index(600.0, edges).tolist() == [2]
    assert bucket_index(torch.tensor([[100, 300], [800, 900]]), edges).tolist() == [0, 3]  # per-token: mean


def test_each_batch_row_uses_its_own_bucket():
    a, b = torch.randn(3, 2, 8), torch.randn(3, 5, 2)
    x = torch.randn(2, 4, 8)
    out = lora_delta(x, a, b, torch.tensor([2, 0]))
    torch.testing.assert_close(out[0], x[0] @ a[2].t() @ b[2].t())
    torch.testing.assert_close(out[1], x[1] @ a[0].t() @ b[0].t())


def test_lora_starts_as_a_no_op_and_trains():
    state = TimestepState((500.0,))
    lora = TimestepLoRA(8, 5, 2, state)
    state.set(torch.tensor([700]))
    x = torch.randn(1, 3, 8)
    assert lora(x).abs().sum() == 0
    lora(x).sum().backward()
    assert lora.b.grad[1].abs().sum() > 0 and lora.b.grad[0].abs().sum() == 0  # only the active bucket learns


def test_the_timestep_is_bound_by_name_whatever_its_position():
    # Wan: forward(hidden_states, timestep, ...); CogVideoX: forward(hidden_states, encoder_hidden_states, timestep, ...)
    for tiny, leading in ((tiny_wan(num_layers=1), ("hidden_states", "timestep")),
                          (tiny_cogvideox(num_layers=1), ("hidden_states", "encoder_hidden_states", "timestep"))):
        inputs = tiny.make_inputs()
        inputs["timestep"] = torch.tensor([800])
        state = TimestepState((250.0, 500.0, 750.0))
        handle = timestep_hook(tiny.model, state)
        with torch.no_grad():
            tiny.model(**inputs)  # by keyword
            assert state.buckets.tolist() == [3]
            state.buckets = None
            rest = {k: v for k, v in inputs.items() if k not in leading}
            tiny.model(*(inputs[name] for name in leading), **rest)  # positionally
            assert state.buckets.tolist() == [3]
        handle.remove()
