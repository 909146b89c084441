"""Calibration samples from a sampling run: record the transformer's forward kwargs at the steps it is called.

    with record_transformer_calls(pipe.transformer, every=5) as recorder:
        pipe(prompt, num_inference_steps=50, output_type="latent")
    plan = calibrate(pipe, recorder.samples, out="plan/")

or in one call, for a diffusers pipeline and a list of prompts: ``collect_pipeline_samples(pipe, prompts)``.
Each recorded call is a candidate (prompt, timestep) pair for salient selection. Classifier-free guidance calls the
transformer twice per step (conditional and unconditional); both are recorded (``keep_uncond=False`` keeps only the
first call of each step). Tensors are detached and moved to ``storage`` (CPU by default) so a long run does not hold
GPU memory; ``calibrate`` moves them back to the model's device.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Sequence

import torch

from .config import CalibrationError

__all__ = ["TransformerCallRecorder", "record_transformer_calls", "collect_pipeline_samples"]


def _store(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_store(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _store(v, device) for k, v in value.items()}
    return value


class TransformerCallRecorder:
    """Collects the kwargs of every ``every``-th step of a transformer (see ``record_transformer_calls``)."""

    def __init__(self, transformer: torch.nn.Module, every: int, keep_uncond: bool, storage: torch.device | str,
                 drop: Sequence[str]) -> None:
        if every < 1:
            raise CalibrationError(f"qsparse_compiler.calibration.pipeline: every={every} must be >= 1 (1 = every step)")
        self.transformer = transformer
        self.every, self.keep_uncond, self.storage, self.drop = every, keep_uncond, storage, set(drop)
        self.samples: list[dict[str, Any]] = []
        self._signature = inspect.signature(transformer.forward)
        self._var_keyword = next(
            (p.name for p in self._signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        self._last_timestep: Any = None
        self._step = -1
        self._calls_this_step = 0

    def _timestep_key(self, timestep: Any) -> Any:
        if isinstance(timestep, torch.Tensor):
            return tuple(timestep.detach().reshape(-1)[:1].cpu().tolist())
        return timestep

    def hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        if "hidden_states" not in bound or "timestep" not in bound:
            raise CalibrationError(
                "qsparse_compiler.calibration.pipeline: the transformer was called without hidden_states/timestep "
                f"(got {sorted(bound)}); record a diffusers video transformer"
            )
        # A new timestep starts a new step (CFG calls the transformer again with the same timestep); a timestep above
        # the last one starts a new sampling run (the next prompt), whose steps are counted from 0 again.
        key = self._timestep_key(bound["timestep"])
        if key != self._last_timestep:
            new_run = self._last_timestep is None or key > self._last_timestep
            self._step = 0 if new_run else self._step + 1
            self._last_timestep, self._calls_this_step = key, 0
        self._calls_this_step += 1
        if self._step % self.every or (self._calls_this_step > 1 and not self.keep_uncond):
            return
        extra = bound.pop(self._var_keyword, {}) if self._var_keyword else {}
        sample = {k: _store(v, self.storage) for k, v in {**bound, **extra}.items() if k not in self.drop}
        self.samples.append(sample)


@contextlib.contextmanager
def record_transformer_calls(
    transformer: torch.nn.Module,
    every: int = 1,
    keep_uncond: bool = True,
    storage: torch.device | str = "cpu",
    drop: Sequence[str] = ("attention_kwargs", "joint_attention_kwargs"),
) -> Iterator[TransformerCallRecorder]:
    """While active, every ``every``-th denoising step's transformer kwargs are appended to ``recorder.samples``."""
    model = getattr(transformer, "_orig_mod", transformer)
    recorder = TransformerCallRecorder(model, every, keep_uncond, storage, drop)
    handle = model.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()


def collect_pipeline_samples(
    pipe: Any,
    prompts: Sequence[str],
    every: int = 5,
    keep_uncond: bool = True,
    **call_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run ``pipe(prompt, **call_kwargs)`` for each prompt (latents only) and return the recorded samples."""
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise CalibrationError(
            f"qsparse_compiler.calibration.pipeline: {type(pipe).__name__} has no `.transformer`; pass a diffusers "
            "video pipeline, or record your own sampling loop with record_transformer_calls(transformer)"
        )
    if isinstance(prompts, str) or not prompts:
        raise CalibrationError("qsparse_compiler.calibration.pipeline: prompts must be a non-empty list of strings")
    call_kwargs.setdefault("output_type", "latent")  # the decoder is not needed for calibration
    with record_transformer_calls(transformer, every, keep_uncond) as recorder, torch.no_grad():
        for prompt in prompts:
            pipe(prompt, **call_kwargs)
    return recorder.samples
