"""qs.optimize on a diffusers-style pipeline without cache_context: the scheduler's step (read, not patched) drives the
residual cache through a CFG sampling loop, branches by call position."""

import copy

import pytest

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import qsparse_compiler as qs
from qsparse_compiler.eval.models import tiny_wan


class CfgPipeline:
    """The shape of a diffusers video pipeline's denoising loop: set_timesteps, two transformer calls, step."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)

    def __call__(self, latents, cond, uncond, steps=4, guidance=3.0):
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            timestep = t.expand(latents.shape[0])
            v_cond = self.transformer(hidden_states=latents, encoder_hidden_states=cond, timestep=timestep,
                                      return_dict=False)[0]
            v_uncond = self.transformer(hidden_states=latents, encoder_hidden_states=uncond, timestep=timestep,
                                        return_dict=False)[0]
            latents = self.scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, latents).prev_sample
        return latents


def test_optimize_tracks_steps_and_cfg_branches():
    tiny = tiny_wan(num_layers=1)
    eager = CfgPipeline(copy.deepcopy(tiny.model))  # optimize compiles the model's blocks in place
    pipe = CfgPipeline(tiny.model)
    options = {"quant": {"enabled": False}, "sparsity": {"density": 0.34, "block_q": 16, "block_kv": 16}}
    qs.optimize(pipe, options=options, cache={"refresh_first": 2, "refresh_every": 0, "order": 1})
    runtime = qs.runtime_of(pipe)
    inputs = tiny.make_inputs()
    latents, cond = inputs["hidden_states"], inputs["encoder_hidden_states"]
    uncond = torch.zeros_like(cond)
    with torch.no_grad():
        first = pipe(latents, cond, uncond)
        report = runtime.memory_report()
        assert report["total"]["branches"] == 2  # conditional and unconditional residuals
        assert report["total"]["refreshes"] == 4 and report["total"]["reuses"] == 4  # 2 refresh + 2 reuse steps x 2
        second = pipe(latents, cond, uncond)  # set_timesteps resets: the same generation again
        expected = eager(latents, cond, uncond)
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()
    assert not {"step", "set_timesteps"} & set(vars(pipe.scheduler))  # observed, not monkeypatched
    # Refresh steps are dense; reuse steps add back a residual from an earlier step: close to dense, not equal.
    error = (first - expected).norm() / expected.norm()
    assert 0 < error < 0.2


def test_cuda_graph_mode_switches_between_a_refresh_and_a_reuse_graph():
    """qs.optimize(cuda_graphs=True): two graphs with one fixed cache path each, chosen per call on the host; the
    results equal the single auto-mode graph's (on CPU Inductor runs them without CUDA graphs)."""
    tiny = tiny_wan(num_layers=1)
    twin = copy.deepcopy(tiny.model)
    options = {"quant": {"enabled": False}, "sparsity": {"density": 0.34, "block_q": 16, "block_kv": 16}}
    cache = {"refresh_first": 2, "refresh_every": 3, "order": 2}
    switching = qs.optimize(tiny.model, options=options, cache=cache, cuda_graphs=True)
    auto = qs.optimize(twin, options=options, cache=cache, regional=False)
    inputs = [tiny.make_inputs() for _ in range(6)]
    outputs = {}
    with torch.no_grad():
        for name, model in (("switching", switching), ("auto", auto)):
            runtime = qs.runtime_of(model)
            with runtime.generation():
                outputs[name] = []
                for step, step_inputs in enumerate(inputs):
                    runtime.step(step)
                    outputs[name].append(model(**step_inputs)[0])
            assert runtime.memory_report()["total"]["reuses"] == 3  # steps 0, 1, 3 refresh; 2, 4, 5 reuse
    for a, b in zip(outputs["switching"], outputs["auto"]):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="compiled as one graph needs one refresh schedule"):
        qs.optimize(tiny_wan(num_layers=1).model, cuda_graphs=True, regional=False)


@pytest.mark.parametrize("kwargs,message", [
    ({"cache": {"order": 2, "refresh_first": 1, "refresh_every": 0}}, r"CacheConfig.order=2 needs two refreshes"),
    ({"options": {"sparsity": {"density": 1.5}}}, r"SparsityConfig.density=1.5"),
    ({"options": {"quant": {"grup_size": 64}}}, r"grup_size"),
])
def test_bad_options_are_refused_by_optimize_not_at_the_first_forward(kwargs, message):
    from qsparse_compiler.config import ConfigError

    tiny = tiny_wan(num_layers=1)
    with pytest.raises(ConfigError, match=message):
        qs.optimize(tiny.model, **kwargs)
