"""Shared tiny setup: a 1-2 layer Wan with random weights and calibration samples at several timesteps."""

import torch

from qsparse_compiler.calibration.config import CalibrationConfig
from qsparse_compiler.testing.models import tiny_wan


def wan_and_samples(num_layers: int = 1, count: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    tiny = tiny_wan(num_layers=num_layers)
    samples = []
    for i in range(count):
        sample = tiny.make_inputs(frames=3)
        sample["timestep"] = torch.tensor([100 + 800 * i // max(count - 1, 1)])
        samples.append(sample)
    return tiny, samples


def tiny_config(**overrides) -> CalibrationConfig:
    """Tiles and groups that fit the tiny model (S = 192 video tokens, K = 64 or 128)."""
    values = dict(block_q=16, block_kv=16, group_size=32, density_budget=0.5, num_samples=2, msad_steps=20,
                  msad_lr=3e-3, ssar_steps=4, ssar_samples=1, progress=False)
    values.update(overrides)
    return CalibrationConfig(**values)
