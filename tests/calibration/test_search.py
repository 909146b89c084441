"""Pattern search: recall bound, global density budget, cost model, and patterns plugged in through the registry."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qsparse_compiler.calibration.config import CalibrationConfig
from qsparse_compiler.calibration.search import CostModel, build_candidates, search_patterns
from qsparse_compiler.calibration.statistics import AttentionStats
from qsparse_compiler.formats import pattern_spec
from qsparse_compiler.formats.patterns import TokenGrid

GRID = TokenGrid(4, 4, 8, seq_len=128)  # 8 x 8 tiles of 16 tokens
BLOCK = 16


BASIC = ("local3d", "dense")  # the expectations below are about these two; the registry holds more patterns


def _config(**kwargs):
    kwargs.setdefault("candidate_patterns", BASIC)
    return CalibrationConfig(block_q=BLOCK, block_kv=BLOCK, **kwargs)


def _stats(mass: torch.Tensor) -> AttentionStats:
    return AttentionStats(GRID, mass.shape[0], 32, mass.to(torch.float64), calls=1)


def _diagonal_mass(heads: int, spread: float = 0.02) -> torch.Tensor:
    mass = torch.full((heads, 8, 8), spread)
    mass[:, torch.arange(8), torch.arange(8)] = 1.0
    return mass


def test_concentrated_heads_take_the_cheapest_pattern_meeting_the_bound():
    result = search_patterns({"blocks.0.attn1": _stats(_diagonal_mass(2))}, _config(recall_bound=0.8, density_budget=1.0))
    choices = result.heads["blocks.0.attn1"]
    assert [c.spec for c in choices] == ["local3d:0.05"] * 2  # the diagonal alone keeps > 80% of the mass
    assert all(c.recall >= 0.8 and c.reason == "bound" for c in choices)
    assert result.budget_met and result.total_density == pytest.approx(8 / 64)
    # the recall of every candidate for every head is kept (plan metadata), dense keeps everything
    table = result.recalls["blocks.0.attn1"]
    assert table["dense"] == [1.0, 1.0] and table["local3d:0.05"] == [round(choices[0].recall, 6)] * 2


def test_uniform_heads_need_dense_under_a_high_bound_then_the_budget_forces_them_down():
    uniform = {"blocks.0.attn1": _stats(torch.ones(2, 8, 8)), "blocks.1.attn1": _stats(torch.ones(2, 8, 8))}
    loose = search_patterns(uniform, _config(recall_bound=0.95, density_budget=1.0))
    assert {c.spec for cs in loose.heads.values() for c in cs} == {"dense"}
    tight = search_patterns(uniform, _config(recall_bound=0.95, density_budget=0.15))
    assert tight.budget_met and tight.total_density <= 0.15
    assert all(c.reason == "budget" for cs in tight.heads.values() for c in cs)


@settings(max_examples=25, deadline=None)
@given(budget=st.floats(0.13, 1.0), seed=st.integers(0, 2**16), bound=st.floats(0.5, 1.0))
def test_search_respects_the_density_budget(budget, seed, bound):
    generator = torch.Generator().manual_seed(seed)
    sites = {f"blocks.{i}.attn1": _stats(torch.rand(3, 8, 8, generator=generator) ** 4) for i in range(3)}
    result = search_patterns(sites, _config(recall_bound=bound, density_budget=budget))
    kept = sum(c.tiles for cs in result.heads.values() for c in cs)
    assert result.budget_met and kept <= budget * 64 * 9 + 1e-9
    assert result.total_density == pytest.approx(kept / (64 * 9))
    # Every spec entry is a valid pattern spec of the layout op, with its own density.
    for fqn in sites:
        pattern_spec.parse_pattern_spec(";".join(result.head_patterns(fqn)), 0.15)


def test_budget_that_cannot_be_met_is_reported():
    result = search_patterns({"blocks.0.attn1": _stats(torch.ones(1, 8, 8))}, _config(density_budget=0.01))
    assert not result.budget_met
    assert any("cannot be met" in note for note in result.notes)
    assert result.heads["blocks.0.attn1"][0].spec == "local3d:0.05"  # as low as the candidates go


def test_a_pattern_registered_later_is_searched_without_changes(monkeypatch):
    def first_column_stripe(grid, block_q, block_kv, density):
        # vertical stripe: every query block sees key block 0, plus its own block (the diagonal)
        qb, kvb = -(-grid.seq_len // block_q), -(-grid.seq_len // block_kv)
        bitmap = torch.eye(qb, kvb, dtype=torch.bool)
        bitmap[:, 0] = True
        return bitmap

    monkeypatch.setitem(pattern_spec.PATTERNS, "test_stripe", first_column_stripe)
    mass = torch.full((2, 8, 8), 0.01)
    mass[0, :, 0] = 1.0  # head 0: a vertical stripe at key block 0 (an attention sink)
    mass[0, torch.arange(8), torch.arange(8)] = 1.0
    mass[1, torch.arange(8), torch.arange(8)] = 1.0  # head 1: diagonal
    config = _config(recall_bound=0.9, density_budget=1.0, candidate_patterns=(*BASIC, "test_stripe"))
    result = search_patterns({"blocks.0.attn1": _stats(mass)}, config)
    specs = result.head_patterns("blocks.0.attn1")
    assert specs[0] == "test_stripe"  # density-independent bitmap: one candidate, bare name
    assert specs[1] == "local3d:0.05"
    assert "test_stripe" in " ".join(next(iter(result.candidates.values())))


def test_failing_pattern_is_noted_not_fatal(monkeypatch):
    def needs_data(grid, block_q, block_kv, density):
        raise RuntimeError("needs q and k")

    monkeypatch.setitem(pattern_spec.PATTERNS, "test_broken", needs_data)
    config = _config(recall_bound=0.8, density_budget=1.0, candidate_patterns=(*BASIC, "test_broken"))
    result = search_patterns({"blocks.0.attn1": _stats(_diagonal_mass(1))}, config)
    assert any("test_broken" in note for note in result.notes)
    assert result.head_patterns("blocks.0.attn1") == ["local3d:0.05"]


def test_cost_model_table_interpolates_and_is_stored():
    model = CostModel({0.1: 1.0, 0.5: 3.0, 1.0: 10.0})
    assert model.cost(0.3, 0) == pytest.approx(2.0)
    assert model.cost(0.05, 0) == pytest.approx(0.5)  # proportional below the table
    assert model.cost(0.0, 0) == 0.0
    assert model.to_json() == {"kind": "measured", "unit": "ms", "table": {"0.1": 1.0, "0.5": 3.0, "1.0": 10.0}}
    proxy = CostModel(None)
    assert proxy.cost(0.3, 17) == 17.0 and proxy.kind == "flop_proxy"
    result = search_patterns({"blocks.0.attn1": _stats(_diagonal_mass(1))},
                             _config(density_budget=1.0, cost_table={0.1: 1.0, 1.0: 10.0}))
    assert result.cost_model["kind"] == "measured"


def test_candidates_are_costed_by_their_measured_density():
    candidates, _ = build_candidates(GRID, BLOCK, BLOCK, BASIC, (0.05, 0.3), CostModel({0.3: 1.0, 1.0: 2.0}))
    by_spec = {c.spec: c for c in candidates}
    assert set(by_spec) == {"local3d:0.05", "local3d:0.3", "dense"}
    assert by_spec["dense"].cost == pytest.approx(2.0) and by_spec["dense"].density == 1.0
    # the cost is read at the density the bitmap really has (tiles kept / video tiles), not the nominal one
    assert by_spec["local3d:0.3"].cost == pytest.approx(CostModel({0.3: 1.0, 1.0: 2.0}).cost(by_spec["local3d:0.3"].density, 0))
    assert by_spec["local3d:0.05"].cost < by_spec["local3d:0.3"].cost < by_spec["dense"].cost


def test_equal_cost_prefers_higher_recall():
    # A launch-bound kernel: every density costs the same, so the bound-meeting choice with the most recall wins.
    result = search_patterns({"blocks.0.attn1": _stats(_diagonal_mass(1))},
                             _config(recall_bound=0.5, density_budget=1.0, cost_table={0.01: 1.0, 1.0: 1.0}))
    assert result.head_patterns("blocks.0.attn1") == ["dense"]


def test_several_video_sizes_are_searched_together():
    small, large = TokenGrid(2, 4, 8, seq_len=64), GRID  # 4 x 4 and 8 x 8 tiles
    diagonal_small = torch.full((1, 4, 4), 0.01)
    diagonal_small[:, torch.arange(4), torch.arange(4)] = 1.0
    sites = {"blocks.0.attn1": [AttentionStats(small, 1, 32, diagonal_small.double(), calls=1),
                                AttentionStats(large, 1, 32, _diagonal_mass(1).double(), calls=3)]}
    result = search_patterns(sites, _config(recall_bound=0.8, density_budget=1.0))
    (choice,) = result.heads["blocks.0.attn1"]
    assert choice.spec == "local3d:0.05"
    assert choice.tiles == 4 + 8 and choice.density == pytest.approx(12 / (16 + 64))  # summed over both grids
    (grids,) = result.candidates
    assert str(small) in grids and str(large) in grids
