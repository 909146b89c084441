"""Seeing a dense model's attentions and linears from the outside, keyed by the module FQNs the passes use.

Attention: diffusers' processors call ``torch.nn.functional.scaled_dot_product_attention`` through the module
attribute at call time (every backend of ``attention_dispatch``), so ``AttentionInterceptor`` swaps that attribute
for a wrapper while it is active, and forward pre/post hooks on the attention modules tell the wrapper which module
(``blocks.0.attn1``) is running. The wrapper hands each video attention to a handler, which may observe it (statistics)
or replace its output (MSAD's sparse student, SSAR's sparse output). Which attentions are *video* attentions follows
the passes (compiler/passes/find_sites.py): self-attention whose sequence is the video grid (Wan ``attn1``) or text + video
(CogVideoX: text first; HunyuanVideo: video first); cross-attention and text-only attention are left alone.

Linears: the block linears are the ``nn.Linear`` modules whose FQN matches ``site_pattern`` (the backend's
``QuantConfig.site_pattern``), named as ``named_modules()`` names them — the same FQN the quantize pass reads from
the weight's placeholder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from ..ops.context import latent_grid
from ..formats.patterns import TokenGrid

__all__ = [
    "AttentionCall",
    "AttentionInterceptor",
    "text_first",
    "block_linear_names",
    "transformer_blocks",
    "is_attention_module",
    "iter_floating",
]

_ORIGINAL_SDPA = F.scaled_dot_product_attention


@dataclass
class AttentionCall:
    """One video attention as SDPA saw it: q, k, v (B, H, S, D), SDPA's key-padding mask (or None), the scale."""

    fqn: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    scale: float
    grid: TokenGrid

    def dense(self) -> torch.Tensor:
        return _ORIGINAL_SDPA(self.q, self.k, self.v, attn_mask=self.key_padding_mask, scale=self.scale)


Handler = Callable[[AttentionCall], "torch.Tensor | None"]


def text_first(model: torch.nn.Module) -> bool:
    """Joint attention order: CogVideoX concatenates [text, video]; HunyuanVideo [video, text]."""
    return "CogVideoX" in type(model).__name__


def is_attention_module(module: torch.nn.Module) -> bool:
    """diffusers attention modules own a ``processor``; other libraries' are named ``...Attention``."""
    return hasattr(module, "processor") or type(module).__name__.endswith("Attention")


def transformer_blocks(model: torch.nn.Module, site_pattern: str) -> list[tuple[str, torch.nn.Module]]:
    """The repeated blocks (children of top-level ModuleLists whose FQN matches ``site_pattern``), in forward order
    of their lists' registration (Wan ``blocks.i``; HunyuanVideo ``transformer_blocks.i`` then
    ``single_transformer_blocks.i``)."""
    pattern = re.compile(site_pattern)
    blocks = []
    for list_name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for index, block in enumerate(child):
                fqn = f"{list_name}.{index}"
                if pattern.search(fqn + "."):
                    blocks.append((fqn, block))
    return blocks


def block_linear_names(model: torch.nn.Module, site_pattern: str) -> list[str]:
    pattern = re.compile(site_pattern)
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and pattern.search(name)]


class AttentionInterceptor:
    """Context manager: route every video attention under ``root`` to ``handler``.

    ``prefix`` is the FQN of ``root`` inside the whole model (``"blocks.3"`` when a block runs on its own), so sites
    keep the names the plan uses. ``grid`` is the (frames, height, width) video grid; None = compute it from each
    forward's ``hidden_states`` (``root`` must then be the transformer itself).
    """

    def __init__(
        self,
        root: torch.nn.Module,
        handler: Handler,
        *,
        prefix: str = "",
        grid: tuple[int, int, int] | None = None,
        model_for_grid: torch.nn.Module | None = None,
    ) -> None:
        self.root = root
        self.handler = handler
        self.prefix = prefix
        self.grid = grid
        self._grid_model = model_for_grid if model_for_grid is not None else root
        self._text_first = text_first(self._grid_model)
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self._saved: Callable | None = None

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _enter_module(self, fqn: str):
        def pre(_module, _args):
            self._stack.append(fqn)

        def post(_module, _args, _output):
            if self._stack and self._stack[-1] == fqn:
                self._stack.pop()

        return pre, post

    def _grid_hook(self, _module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor):
            self.grid = latent_grid(self._grid_model, hidden)

    def __enter__(self) -> "AttentionInterceptor":
        for name, module in self.root.named_modules():
            if name and is_attention_module(module):
                fqn = f"{self.prefix}.{name}" if self.prefix else name
                pre, post = self._enter_module(fqn)
                self._handles.append(module.register_forward_pre_hook(pre))
                self._handles.append(module.register_forward_hook(post))
        if self.grid is None:
            self._handles.append(self.root.register_forward_pre_hook(self._grid_hook, with_kwargs=True))
        self._saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._sdpa  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        F.scaled_dot_product_attention = self._saved  # type: ignore[assignment]
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()

    # -- the SDPA wrapper --------------------------------------------------------------------------------------------
    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        call = self._video_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if call is not None:
            out = self.handler(call)
            if out is not None:
                return out
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)

    def _video_call(self, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa) -> AttentionCall | None:
        if not self._stack or self.grid is None or dropout_p or is_causal or enable_gqa or q.ndim != 4:
            return None
        if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
            return None  # cross-attention or GQA: dense, as in the passes
        if mask is not None and not (mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[1:3] == (1, 1)):
            return None  # only SDPA's key-padding form is supported by the sparse op
        frames, height, width = self.grid
        seq_len, video_len = q.shape[2], frames * height * width
        if seq_len < video_len:
            return None  # text-only attention (HunyuanVideo's token refiner)
        video_start = seq_len - video_len if self._text_first else 0
        grid = TokenGrid(frames, height, width, seq_len, video_start)
        scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
        return AttentionCall(self._stack[-1], q, k, v, mask, scale, grid)


def iter_floating(value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every floating tensor inside nested args/kwargs (for finiteness checks)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield "", value
    elif isinstance(value, dict):
        for key, item in value.items():
            for path, tensor in iter_floating(item):
                yield f"{key}{'.' + path if path else ''}", tensor
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            for path, tensor in iter_floating(item):
                yield f"{index}{'.' + path if path else ''}", tensor
