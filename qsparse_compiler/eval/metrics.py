"""Reference comparisons used by tests and benchmarks: relative error, SQNR, the 2x-reference rule."""

from __future__ import annotations

import math

import torch

__all__ = ["relative_error", "sqnr_db", "within_reference_error"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    expected64 = expected.detach().to(torch.float64)
    diff = actual.detach().to(torch.float64) - expected64
    return float(diff.norm() / expected64.norm().clamp_min(1e-300))


def sqnr_db(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    error = relative_error(actual, expected)
    return math.inf if error == 0 else -20.0 * math.log10(error)


def within_reference_error(
    actual: torch.Tensor, same_dtype_reference: torch.Tensor, exact: torch.Tensor, factor: float = 2.0, floor: float = 1e-6
) -> tuple[bool, float, float]:
    """flash-attention's rule: a kernel's error vs the fp32 (exact) result may be at most ``factor`` times the error
    of the same-dtype torch implementation (plus a tiny floor for results torch gets exactly right)."""
    ours, theirs = relative_error(actual, exact), relative_error(same_dtype_reference, exact)
    return ours <= factor * theirs + floor, ours, theirs
