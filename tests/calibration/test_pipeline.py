"""Samples recorded from a sampling run, and calibrate(pipeline, prompts)."""

import pytest
import torch

from qsparse_compiler.calibration import CalibrationError, calibrate, collect_pipeline_samples, record_transformer_calls

from ._tiny import TinyFlowPipeline, tiny_config, wan_and_samples


def test_every_nth_step_is_recorded_with_both_guidance_branches():
    tiny, _ = wan_and_samples()
    pipe = TinyFlowPipeline(tiny.model)
    samples = collect_pipeline_samples(pipe, ["a red ball", "a blue cube"], every=2, num_inference_steps=6)
    # per prompt: steps 0, 2, 4 of 6, conditional + unconditional call each
    assert len(samples) == 2 * 3 * 2
    timesteps = [float(s["timestep"][0]) for s in samples]
    assert timesteps[:6] == pytest.approx([1000, 1000, 1000 * 4 / 6, 1000 * 4 / 6, 1000 * 2 / 6, 1000 * 2 / 6])
    assert timesteps[6:] == timesteps[:6]  # the second prompt's steps are counted from 0 again
    assert set(samples[0]) == {"hidden_states", "timestep", "encoder_hidden_states", "return_dict"}
    assert samples[1]["encoder_hidden_states"].abs().sum() == 0  # the unconditional branch
    only_cond = collect_pipeline_samples(pipe, ["a red ball"], every=2, keep_uncond=False, num_inference_steps=6)
    assert len(only_cond) == 3 and all(s["encoder_hidden_states"].abs().sum() > 0 for s in only_cond)


def test_recorded_tensors_are_copies_on_the_storage_device():
    tiny, samples = wan_and_samples(count=1)
    inputs = samples[0]
    with record_transformer_calls(tiny.model) as recorder, torch.no_grad():
        tiny.model(**inputs)
    (recorded,) = recorder.samples
    inputs["hidden_states"].add_(1.0)  # the caller reuses its buffers between steps
    assert not torch.equal(recorded["hidden_states"], inputs["hidden_states"])
    assert recorded["hidden_states"].device.type == "cpu"


def test_calibrate_from_a_pipeline_and_prompts():
    tiny, _ = wan_and_samples()
    pipe = TinyFlowPipeline(tiny.model)
    plan = calibrate(pipe, ["a red ball", "a blue cube"], tiny_config(num_samples=3, msad_steps=5),
                     pipeline_kwargs={"num_inference_steps": 4, "every": 2})
    selection = plan.metadata["calibration"]["selection"]
    assert len(selection["scores"]) == 8 and len(selection["selected"]) == 3
    assert set(plan.attentions) == {"blocks.0.attn1"}
    with pytest.raises(CalibrationError, match="prompts need a diffusers pipeline"):
        calibrate(tiny.model, ["a red ball"], tiny_config())
