"""Shared tiny setup: a 1-2 layer Wan with random weights and calibration samples at several timesteps."""

import torch

from qsparse_compiler.calibration.config import CalibrationConfig
from qsparse_compiler.eval.models import tiny_wan


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


class TinyFlowPipeline:
    """The shape of a diffusers video pipeline (a ``.transformer`` and ``__call__(prompt, ...)`` that calls it with
    keyword arguments each step, twice with classifier-free guidance), sampling with flow-matching Euler like Wan's
    pipeline. The prompt is "encoded" into a fixed random text embedding per prompt."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, prompt, num_inference_steps=6, guidance_scale=5.0, output_type="latent", frames=3):
        generator = torch.Generator().manual_seed(sum(map(ord, prompt)))
        text = torch.randn(1, 8, 32, generator=generator)
        empty = torch.zeros(1, 8, 32)
        latents = torch.randn(1, 4, frames, 16, 16, generator=generator)
        timesteps = torch.linspace(1000.0, 0.0, num_inference_steps + 1)
        for t, t_next in zip(timesteps[:-1], timesteps[1:]):
            kwargs = dict(hidden_states=latents, timestep=t.expand(1), return_dict=False)
            cond = self.transformer(encoder_hidden_states=text, **kwargs)[0]
            uncond = self.transformer(encoder_hidden_states=empty, **kwargs)[0]
            velocity = uncond + guidance_scale * (cond - uncond)
            latents = latents + (t_next - t) / 1000.0 * velocity
        assert output_type == "latent"
        return latents
