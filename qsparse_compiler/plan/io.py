"""Save and load plans (plan.json + plan.safetensors). No code path unpickles."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .schema import Plan, PlanError

__all__ = ["save_plan", "load_plan", "PLAN_JSON", "PLAN_TENSORS"]

PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"


def save_plan(plan: Plan, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in plan.tensors.items()}
    # Write tensors first and the json last: a json that exists names tensors that exist.
    save_file(tensors, str(folder / PLAN_TENSORS), metadata={"schema_version": str(plan.schema_version)})
    (folder / PLAN_JSON).write_text(json.dumps(plan.to_json(), indent=2, sort_keys=False))
    return folder


def load_plan(directory: str | Path) -> Plan:
    """Load and validate a plan; every problem raises PlanError before any compute happens."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(directory)
    json_path, tensor_path = folder / PLAN_JSON, folder / PLAN_TENSORS
    if not json_path.is_file():
        raise PlanError(f"qsparse_compiler.plan: {json_path} not found; a plan directory holds {PLAN_JSON} and {PLAN_TENSORS}")
    try:
        data = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"qsparse_compiler.plan: {json_path} is not valid JSON ({exc}); the file is truncated or corrupt") from None
    if not isinstance(data, dict):
        raise PlanError(f"qsparse_compiler.plan: {json_path} must hold a JSON object")
    tensors: dict[str, torch.Tensor] = {}
    if data.get("tensors"):
        if not tensor_path.is_file():
            raise PlanError(f"qsparse_compiler.plan: {tensor_path} not found but plan.json lists tensors")
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PlanError(f"qsparse_compiler.plan: {tensor_path} is not a readable safetensors file ({exc})") from None
    return Plan.from_json(data, tensors)
