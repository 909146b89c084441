"""Calibration samples: dicts of transformer forward kwargs (hidden_states, encoder_hidden_states, timestep, ...).

Checked up front (a NaN in a sample fails here, naming the sample and the key, not deep inside a hook), digested
for the resume logic (a checkpoint made from other samples is stale), and run through the model with one helper
that returns the prediction tensor whatever the model's return convention.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch

from .config import CalibrationError
from .hooks import iter_floating

__all__ = ["check_samples", "samples_digest", "timestep_of", "run_model", "model_output"]


def check_samples(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(samples, Mapping) or not isinstance(samples, Sequence) or len(samples) == 0:
        raise CalibrationError(
            "qsparse_compiler.calibration: samples must be a non-empty list of dicts of transformer forward kwargs "
            f"(hidden_states, encoder_hidden_states, timestep); got {type(samples).__name__}"
        )
    checked = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or not isinstance(sample.get("hidden_states"), torch.Tensor):
            raise CalibrationError(
                f"qsparse_compiler.calibration: sample {index} must be a dict with a 'hidden_states' tensor "
                f"(the latents, e.g. (B, C, F, H, W) for Wan); got keys {sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__}"
            )
        if "timestep" not in sample:
            raise CalibrationError(f"qsparse_compiler.calibration: sample {index} has no 'timestep' (needed by every video DiT)")
        for path, tensor in iter_floating(dict(sample)):
            if not bool(torch.isfinite(tensor).all()):
                raise CalibrationError(
                    f"qsparse_compiler.calibration: sample {index} input '{path}' {tuple(tensor.shape)} holds NaN/inf; "
                    "calibration needs finite inputs - check the latents / text embeddings that produced it, or drop the "
                    "sample from the list"
                )
        checked.append(dict(sample))
    return checked


def samples_digest(samples: Sequence[Mapping[str, Any]]) -> str:
    """A cheap content hash: shapes, dtypes and float64 sums of every tensor."""
    digest = hashlib.sha256()
    for sample in samples:
        for key in sorted(sample):
            value = sample[key]
            if isinstance(value, torch.Tensor):
                digest.update(f"{key}{tuple(value.shape)}{value.dtype}{float(value.double().sum()):.10e}".encode())
            else:
                digest.update(f"{key}={value!r}".encode())
    return digest.hexdigest()[:16]


def timestep_of(sample: Mapping[str, Any]) -> float:
    t = sample["timestep"]
    return float(t.float().mean()) if isinstance(t, torch.Tensor) else float(t)


def model_output(output: Any) -> torch.Tensor:
    """The prediction tensor of a diffusers output (tuple with return_dict=False, or an output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return model_output(output[0])
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise CalibrationError(f"qsparse_compiler.calibration: cannot find the prediction tensor in a {type(output).__name__}")


def run_model(model: torch.nn.Module, sample: Mapping[str, Any], **overrides: Any) -> torch.Tensor:
    kwargs = {**sample, **overrides}
    if "return_dict" in _forward_params(model):
        kwargs["return_dict"] = False
    return model_output(model(**kwargs))


def _forward_params(model: torch.nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
