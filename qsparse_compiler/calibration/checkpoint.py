"""Per-stage checkpoints of a calibration run, in ``<out>/calibration/`` (json + safetensors, never pickle).

Each stage writes its tensors first and its json last (a json that exists names tensors that exist), each file to a
temporary name renamed into place (atomic on POSIX: a kill mid-write leaves the old file or none, never half of
one; a tensor file that still fails to load is recomputed, not trusted), and the json
holds the stage's *key*: a hash of everything the stage's result depends on (the config fields it reads, the model
fingerprint, the samples, the keys of the stages before it). ``resume=True`` reuses a stage whose key matches and
recomputes it otherwise, so a changed setting never silently reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["StageStore", "stage_key"]


def stage_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageStore:
    """Read and write stage results under ``folder``; a ``None`` folder stores nothing (no resume)."""

    def __init__(self, folder: Path | None, resume: bool) -> None:
        self.folder = folder
        self.resume = resume
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def load(self, name: str, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """(json data, tensors) of a finished stage with this key, or None."""
        if self.folder is None or not self.resume:
            return None
        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn write: recompute
        if record.get("key") != key:
            return None
        tensors: dict[str, torch.Tensor] = {}
        if record.get("has_tensors"):
            from safetensors.torch import load_file

            tensor_path = self.folder / f"{name}.safetensors"
            if not tensor_path.is_file():
                return None
            try:
                tensors = load_file(str(tensor_path))
            except Exception:  # safetensors' own error types vary by version: any unreadable file is recomputed
                return None
        return record["data"], tensors

    def save(self, name: str, key: str, data: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if tensors:
            from safetensors.torch import save_file

            tensor_path = self.folder / f"{name}.safetensors"
            tensor_tmp = tensor_path.with_suffix(".safetensors.tmp")
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tensor_tmp))
            tensor_tmp.replace(tensor_path)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"key": key, "has_tensors": bool(tensors), "data": data}, indent=1))
        tmp.replace(path)  # atomic: a crash leaves the old json or the new one, never half of one
