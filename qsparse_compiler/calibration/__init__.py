"""Calibration: dense model + samples -> Plan (statistics, salient selection, pattern search, MSAD, SSAR settings).

    from qsparse_compiler.calibration import calibrate, CalibrationConfig
    plan = calibrate(transformer, samples, CalibrationConfig(density_budget=0.15), out="wan-plan/")

One concern per module: config (CalibrationConfig), hooks (what the dense model does, by module FQN),
attention_maps (chunk-wise pooled maps), statistics, salient (S²Q selection), search (Sparse-vDiT pattern search +
cost model), fake_quant (differentiable W4A8), msad (block-wise distillation), lora (timestep-aware LoRA), ssar
(residual-cache settings), pattern_attention (a plan's sparse attention in plain torch), checkpoint (resumable
stages), pipeline (samples recorded from a sampling run), simulate (a plan run eagerly), driver (calibrate, samples
files, the CLI entry).
"""

from .driver import calibrate, calibrate_cli_main, linear_plans, load_samples, save_samples
from .config import CalibrationConfig, CalibrationError
from .pipeline import collect_pipeline_samples, record_transformer_calls
from .search import CostModel, SearchResult, search_patterns
from .simulate import plan_applied

__all__ = [
    "calibrate",
    "calibrate_cli_main",
    "CalibrationConfig",
    "CalibrationError",
    "CostModel",
    "collect_pipeline_samples",
    "record_transformer_calls",
    "SearchResult",
    "search_patterns",
    "linear_plans",
    "plan_applied",
    "load_samples",
    "save_samples",
]
