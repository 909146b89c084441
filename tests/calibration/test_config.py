"""CalibrationConfig validates every field with a message naming it, and round-trips through JSON."""

import json

import pytest

from qsparse_compiler.calibration.config import CalibrationConfig
from qsparse_compiler.config import ConfigError


@pytest.mark.parametrize(
    "field, value",
    [
        ("density_budget", 0.0),
        ("density_budget", 1.5),
        ("recall_bound", -0.1),
        ("candidate_patterns", ("no_such_pattern",)),
        ("candidate_densities", ()),
        ("block_q", 100),
        ("cost_table", {2.0: 1.0}),
        ("group_size", 3),
        ("act_format", "int4"),
        ("selection", "best"),
        ("conditioning_linears", "int8"),
        ("num_samples", -1),
        ("msad_lr", 0.0),
        ("lambda_global", -1.0),
        ("ssar_steps", 1),
        ("site_pattern", "(unclosed"),
        ("version", 2),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field if field != "site_pattern" else "site_pattern"):
        CalibrationConfig(**{field: value})


def test_defaults_follow_the_design():
    config = CalibrationConfig()
    assert config.density_budget == 0.15 and config.group_size == 128 and config.block_q == 128


def test_json_round_trip_and_unknown_keys():
    config = CalibrationConfig(cost_table={0.1: 0.5, 1.0: 4.0}, candidate_patterns=("local3d",), msad_steps=7)
    data = json.loads(json.dumps(config.to_json()))
    assert CalibrationConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="unknown CalibrationConfig option"):
        CalibrationConfig.from_dict({"budget": 0.1})


def test_stage_hash_changes_only_with_its_fields():
    a, b = CalibrationConfig(), CalibrationConfig(msad_steps=5)
    assert a.stage_hash("block_q", "density_budget") == b.stage_hash("block_q", "density_budget")
    assert a.stage_hash("msad_steps") != b.stage_hash("msad_steps")
