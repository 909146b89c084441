"""Denoising-factor loss alignment (MSFP's DFA): weight each sample's distillation loss by how much an error in the
model output at its timestep moves the sampled latent.

A flow-matching Euler step (Wan, HunyuanVideo) is x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, t_i): an output
error e at step i moves the next latent by |sigma_{i+1} - sigma_i| * e, the step's denoising factor f. With the
samplers' shifted schedule sigma(u) = s * u / (1 + (s - 1) * u) over an evenly spaced u (s: the flow shift, 1 = none)
and t = 1000 * sigma (the timestep the model sees),

    f(t) = |d sigma / d u| * du = (s - (s - 1) * sigma)^2 / s * du,    sigma = t / 1000,

so f is proportional to (s - (s - 1) * sigma)^2 (du is the same for every step and cancels below). The loss is a
squared error, so a sample's weight is f(t)^2, averaged over a sample's rows (rows may sit at different timesteps)
and normalised to mean 1 over the samples being distilled: the loss keeps its scale (``msad_lr`` keeps its meaning)
and only its balance between timesteps changes, towards the steps whose errors reach the video most (with s > 1,
the low-noise end). Without a shift (s = 1) every step has the same factor: DFA changes nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["denoising_factor", "dfa_weights"]


def denoising_factor(timestep: torch.Tensor | float, flow_shift: float) -> torch.Tensor:
    """f(t) up to the constant step du, per row of ``timestep`` (fp64)."""
    sigma = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).clamp(0.0, 1000.0) / 1000.0
    return (flow_shift - (flow_shift - 1.0) * sigma).pow(2) / flow_shift


def dfa_weights(timesteps: Sequence[torch.Tensor | float], flow_shift: float) -> list[float]:
    """One loss weight per sample: f(t)^2 (mean over its rows), normalised to mean 1 over ``timesteps``."""
    raw = [float(denoising_factor(t, flow_shift).pow(2).mean()) for t in timesteps]
    mean = sum(raw) / len(raw) if raw else 1.0
    return [w / mean for w in raw]
