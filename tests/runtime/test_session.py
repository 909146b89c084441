"""Two models compiled in one process, each with its own Session, share nothing: packed weights, residual caches,
step clocks and reports stay with their own session, and the default session sees none of it."""

import pytest
import torch

from qsparse_compiler.compiler.backend import reports
from qsparse_compiler.config import CacheConfig
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import tiny_wan
from qsparse_compiler.runtime.session import Session, default_session

OPTIONS = {
    "sparsity": {"density": 0.34, "block_q": 16, "block_kv": 16},
    "cache": {"enabled": True, "refresh_first": 1, "refresh_every": 2, "order": 1},
}


def _packed(session: Session, model: torch.nn.Module) -> int:
    """How many of ``model``'s parameters have packed int4 weights in ``session``."""
    return sum(session.weights.packed_nbytes(param) is not None for param in model.parameters())


@pytest.mark.slow
def test_two_models_in_two_sessions_share_nothing():
    torch._dynamo.reset()
    torch.manual_seed(0)
    first, second = tiny_wan(num_layers=1), tiny_wan(num_layers=1)  # same FQNs, different weights
    sessions = Session(), Session()
    default_packed, default_reports = len(default_session().weights), len(reports())
    compiled = [torch.compile(tiny.model, backend="quantsparse", options={**OPTIONS, "session": session},
                              fullgraph=True) for tiny, session in zip((first, second), sessions)]
    inputs = first.make_inputs()
    steps = (3, 2)  # interleaved: the first model runs three denoising steps, the second two, each on its own clock
    outputs = {0: [], 1: []}
    with torch.no_grad():
        for step in range(max(steps)):
            for index in (0, 1):
                if step < steps[index]:
                    sessions[index].cache.step(step)
                    outputs[index].append(compiled[index](**inputs)[0])
    for index, (tiny, session) in enumerate(zip((first, second), sessions)):
        other = (second, first)[index]
        assert len(session.reports) == 1 and session.reports[0].counters["residual_attention"] == 1
        quantized = session.reports[0].counters["w4a8_linear"]
        assert quantized > 0 and _packed(session, tiny.model) == len(session.weights) == quantized
        assert _packed(session, other.model) == 0
        totals = session.cache.memory_report()["total"]
        assert totals["branches"] == 1 and totals["bytes"] > 0
        # each model's quantized output is its own, close to its eager output (W4A8 rounding only)
        eager = tiny.model(**inputs)[0]
        assert relative_error(outputs[index][0], eager) < 0.1
    schedule = CacheConfig(**OPTIONS["cache"])
    for session, count in zip(sessions, steps):
        assert session.cache.current_step == count - 1
        refreshes = sum(step == 0 or schedule.is_refresh_step(step) for step in range(count))
        totals = session.cache.memory_report()["total"]
        assert (totals["refreshes"], totals["reuses"]) == (refreshes, count - refreshes)
    assert len(default_session().weights) == default_packed and len(reports()) == default_reports


def test_a_session_option_that_is_not_a_session_is_refused():
    torch._dynamo.reset()
    model = torch.nn.Linear(64, 64)
    compiled = torch.compile(model, backend="quantsparse", options={"session": "mine"})
    with pytest.raises(Exception, match="ConfigError: .*QuantSparseConfig.session='mine' is not a Session"):
        compiled(torch.randn(2, 64))
