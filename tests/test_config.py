"""Backend options: typed, validated, with errors that name the field and the fix."""

import pytest
import torch

from qsparse_compiler.config import ConfigError, QuantConfig, QuantSparseConfig, SparsityConfig


def test_defaults_and_dict_options():
    config = QuantSparseConfig.from_options({"quant": {"group_size": 64}, "sparsity": {"density": 0.2}})
    assert config.quant == QuantConfig(group_size=64) and config.sparsity.density == 0.2
    assert QuantSparseConfig.from_options(None) == QuantSparseConfig()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"qaunt": {}}, r"unknown backend option\(s\) \['qaunt'\]"),
        ({"quant": {"bits": 3}}, r"unknown quant option\(s\) \['bits'\]"),
        ({"quant": {"group_size": 31}}, "QuantConfig.group_size=31 must be 0 .per channel. or a positive even"),
        ({"quant": {"group_size": -2}}, "QuantConfig.group_size=-2"),
        ({"quant": {"act_format": "fp4"}}, "QuantConfig.act_format='fp4' must be one of"),
        ({"sparsity": {"density": 0.0}}, r"SparsityConfig.density=0.0 must be a number in \(0, 1\]"),
        ({"sparsity": {"density": 1.5}}, "SparsityConfig.density=1.5"),
        ({"sparsity": {"block_q": 100}}, "SparsityConfig.block_q=100 must be a power of two"),
        ({"sparsity": {"pattern": "random"}}, "SparsityConfig.pattern='random' must be a pattern spec of"),
        ({"plan": "/nonexistent/plan"}, "is not a directory; pass the folder written by `qsparse calibrate"),
        ({"report": "yes"}, "QuantSparseConfig.report='yes' must be True or False"),
        ({"quant": 3}, "quant must be a QuantConfig or a dict"),
        ({"cache": {"storage": "int4"}}, r"CacheConfig.storage='int4' must be one of \('model', 'fp8_e4m3'\)"),
        ({"cache": {"storage": "fp8_e4m3", "rank": 8}}, "applies to full-rank caches only .rank=8.; use rank=0"),
        ({"parallel": {"ulysses_degree": 0}}, "ParallelConfig.ulysses_degree=0 must be an int >= 1"),
        ({"parallel": {"ulysses_degree": 2, "ulysses_rank": 2}}, r"ParallelConfig.ulysses_rank=2 must be an int in"),
    ],
)
def test_bad_options_fail_with_a_clear_message(options, message):
    with pytest.raises(ConfigError, match=message):
        QuantSparseConfig.from_options(options)


def test_dataclass_validates_too():
    with pytest.raises(ConfigError):
        SparsityConfig(block_kv=0)


def test_bad_options_fail_at_torch_compile():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="quantsparse", options={"sparsity": {"density": 2}})
    with pytest.raises(Exception, match="SparsityConfig.density=2"):
        compiled(torch.randn(2, 4))
