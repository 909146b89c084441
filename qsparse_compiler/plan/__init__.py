"""Plans: versioned schema, model fingerprint, save/load (json + safetensors, never pickle)."""

from .io import load_plan, save_plan
from .schema import PLAN_SCHEMA_VERSION, AttentionPlan, LinearPlan, ModelFingerprint, Plan, PlanError

__all__ = [
    "PLAN_SCHEMA_VERSION", "AttentionPlan", "LinearPlan", "ModelFingerprint", "Plan", "PlanError", "load_plan", "save_plan",
]
