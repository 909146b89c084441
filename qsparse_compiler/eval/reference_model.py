"""The reference video DiT: a small diffusers ``WanTransformer3DModel`` trained on synthetic videos, and its sampler.

No pretrained video model can be downloaded here, so the project trains its own yardstick
(``examples/train_reference_model.py``, one 10-minute GPU command) and commits the weights under ``assets/``:

    assets/reference_dit.safetensors   weights (bf16; the modules diffusers keeps in fp32 are stored in fp32)
    assets/reference_dit.json          {"model": WanTransformer3DModel config, "data": SyntheticVideoConfig,
                                        "sampler": defaults, "training": how the weights were made,
                                        "checksum": CPU float32 output summary checked by the tests}

Why this size (``REFERENCE_MODEL_CONFIG``):
- Tokens: videos are 16 x 64 x 64 RGB "latents" (no VAE); patch (1, 2, 2) gives 16 x 32 x 32 = 16,384 video
  tokens, the shape of a real Wan latent grid (frame-major, f x h x w) at a size where 128 x 128 attention tiles
  form a 128 x 128 tile grid — enough for 3D-local, multi-diagonal and stripe patterns to differ.
- Heads: 4 heads of dim 64 (inner dim 256). Head dim 64 is one of the two the sparse kernel supports (64, 128);
  4 heads over 8 layers give 32 attention maps, enough to see per-head pattern choice matter.
- Depth 8, FFN 768 (3x): 8.0 M parameters, 15.5 MiB as safetensors (under the 16 MiB that one device-run file may
  carry and the 20 MB budget), and a model that trains to visible moving shapes within ~8 minutes on one H100
  (attention over 16k tokens dominates the cost, so depth is what the wall clock limits).
- Text: 8 prompt tokens of dim 64 (``SyntheticVideoConfig``); cross-attention and its norm as in Wan 2.1.

Sampling is flow matching as in Wan: x_t = (1 - sigma) x_0 + sigma * noise, the model predicts the velocity
noise - x_0 from (x_t, timestep = 1000 sigma, prompt), and diffusers' ``FlowMatchEulerDiscreteScheduler`` with
``shift`` integrates from sigma = 1 to 0. Classifier-free guidance uses the all-zero prompt as "empty text" (the
training dropped 10% of prompts to zero). Conditional and unconditional passes are separate model calls, as in
diffusers' WanPipeline, so per-call state (e.g. a residual cache) sees the same call pattern as with the real pipeline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .synthetic_video import SyntheticVideoConfig, SyntheticVideos

__all__ = [
    "ASSETS_DIR",
    "REFERENCE_MODEL_CONFIG",
    "TINY_MODEL_CONFIG",
    "build_reference_model",
    "checksum_summary",
    "initial_noise",
    "load_reference_metadata",
    "load_reference_model",
    "sample_videos",
    "save_reference_model",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
WEIGHTS_NAME = "reference_dit.safetensors"
CONFIG_NAME = "reference_dit.json"

REFERENCE_MODEL_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 64,
    "freq_dim": 256,
    "ffn_dim": 768,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

# Same architecture family at toy size, for CPU tests and the CPU dry run of the training script.
TINY_MODEL_CONFIG: dict[str, Any] = {
    **REFERENCE_MODEL_CONFIG,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
}

DEFAULT_SHIFT = 3.0  # Wan 2.1 uses flow shift 3.0 at 480p; our token count (16k) is of that order.
DEFAULT_STEPS = 30


def _where(fn: str) -> str:
    return f"qsparse_compiler.eval.reference_model.{fn}"


def build_reference_model(config: dict[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """A randomly initialised ``WanTransformer3DModel`` (fp32, CPU) with ``config`` (default: the reference one).
    Initialisation is deterministic from ``seed`` and leaves the global RNG untouched."""
    from diffusers import WanTransformer3DModel

    cfg = dict(REFERENCE_MODEL_CONFIG if config is None else config)
    cfg["patch_size"] = tuple(cfg["patch_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**cfg)
    return model


def _keep_fp32(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "_keep_in_fp32_modules", None) or ())


def _is_fp32_param(name: str, keep: Sequence[str]) -> bool:
    # The same rule diffusers' from_pretrained applies: a parameter stays fp32 when a path component names a module
    # listed in the model's _keep_in_fp32_modules (norms, time embedder, modulation tables).
    return any(k in name.split(".") for k in keep)


def cast_like_diffusers(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype`` in place, but keep the model's ``_keep_in_fp32_modules``
    (norms, time embedder, modulation tables, RoPE tables) in fp32 when ``dtype`` is half precision, as
    ``from_pretrained(torch_dtype=...)`` does; Wan's forward relies on those being fp32. (``model.to(dtype)`` would
    cast them too, and diffusers warns about exactly that.)"""
    keep = _keep_fp32(model) if dtype in (torch.float16, torch.bfloat16) else ()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if _is_fp32_param(name, keep) else dtype)
    return model


def save_reference_model(model: nn.Module, out_dir: str | Path, metadata: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``reference_dit.safetensors`` (bf16, fp32 for the kept-fp32 modules) and ``reference_dit.json``
    (``metadata`` plus the model config under "model"). Returns the two paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = _keep_fp32(model)
    tensors = {}
    for name, param in model.state_dict().items():
        dtype = torch.float32 if _is_fp32_param(name, keep) else torch.bfloat16
        tensors[name] = param.detach().to("cpu", dtype).contiguous()
    weights = out / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "pt", "model": "WanTransformer3DModel"})
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if not k.startswith("_")}
    meta = {"model": {k: cfg[k] for k in REFERENCE_MODEL_CONFIG if k in cfg}, **{k: v for k, v in metadata.items() if k != "model"}}
    config = out / CONFIG_NAME
    config.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return weights, config


def load_reference_metadata(assets_dir: str | Path | None = None) -> dict[str, Any]:
    """The committed ``reference_dit.json`` (model config, data config, sampler defaults, training record)."""
    path = Path(assets_dir or ASSETS_DIR) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{_where('load_reference_metadata')}: {path} is missing; train the model with "
            "examples/train_reference_model.py and copy its output into qsparse_compiler/eval/assets/"
        )
    return json.loads(path.read_text())


def load_reference_model(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, assets_dir: str | Path | None = None
) -> nn.Module:
    """The trained reference ``WanTransformer3DModel`` in eval mode without gradients, on ``device`` in ``dtype``
    (modules diffusers keeps in fp32 stay fp32 for bf16/fp16). Loads only committed local files."""
    from safetensors.torch import load_file

    assets = Path(assets_dir or ASSETS_DIR)
    meta = load_reference_metadata(assets)
    # Build on the meta device (no random init: 0.02 s instead of 0.7 s on a CPU), then fill in the weights.
    with torch.device("meta"):
        model = build_reference_model(meta["model"])
    model.to_empty(device="cpu")
    # The RoPE tables are non-persistent buffers (not in the state dict): rebuild that module for real.
    cfg = meta["model"]
    model.rope = type(model.rope)(cfg["attention_head_dim"], tuple(cfg["patch_size"]), cfg["rope_max_seq_len"])
    state = load_file(str(assets / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{_where('load_reference_model')}: {assets / WEIGHTS_NAME} does not match the config in {CONFIG_NAME}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}; re-run examples/train_reference_model.py"
        )
    cast_like_diffusers(model, dtype)
    model.to(device).eval().requires_grad_(False)
    return model


def data_config(meta: dict[str, Any] | None = None) -> SyntheticVideoConfig:
    """The ``SyntheticVideoConfig`` the reference model was trained on (from the committed metadata)."""
    meta = meta if meta is not None else load_reference_metadata()
    return SyntheticVideoConfig.from_dict(meta.get("data", {}))


def initial_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """float32 [len(seeds), *shape] standard normal; video ``i`` from a CPU generator seeded ``seeds[i]``, so the
    same seed gives the same starting noise on every device and in every batch composition."""
    if len(seeds) == 0:
        raise ValueError(f"{_where('initial_noise')}: seeds must not be empty")
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    # The patch embedding's dtype is the compute dtype (fp32-kept modules are norms and embedders).
    inner = getattr(model, "_orig_mod", model)
    patch = getattr(inner, "patch_embedding", None)
    param = patch.weight if patch is not None else next(inner.parameters())
    return param.device, param.dtype


@torch.no_grad()
def sample_videos(
    model: Callable[..., Any],
    prompts: torch.Tensor,
    seeds: Sequence[int],
    *,
    frames: int,
    height: int,
    width: int,
    channels: int = 3,
    num_steps: int = DEFAULT_STEPS,
    shift: float = DEFAULT_SHIFT,
    guidance_scale: float = 1.0,
    negative_prompts: torch.Tensor | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate videos with flow-matching Euler steps (diffusers' ``FlowMatchEulerDiscreteScheduler``).

    model: a ``WanTransformer3DModel`` or anything with its call signature (e.g. ``torch.compile`` of one).
    prompts: float [B, L_text, text_dim]; seeds: B ints (the starting noise, see ``initial_noise``).
    guidance_scale > 1 runs an unconditional pass per step on ``negative_prompts`` (default: zeros).
    on_step(i, t) is called after step ``i`` (e.g. to advance a per-step runtime state).
    Returns float32 [B, channels, frames, height, width] clamped to [-1, 1].
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    b = prompts.shape[0]
    if len(seeds) != b:
        raise ValueError(f"{_where('sample_videos')}: {b} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if num_steps < 1:
        raise ValueError(f"{_where('sample_videos')}: num_steps={num_steps} must be >= 1")
    p_device, p_dtype = _param_device_dtype(model) if isinstance(model, nn.Module) else (torch.device("cpu"), torch.float32)
    device = torch.device(device) if device is not None else p_device
    dtype = dtype or p_dtype
    cond = prompts.to(device, dtype)
    uncond = None
    if guidance_scale != 1.0:
        uncond = torch.zeros_like(cond) if negative_prompts is None else negative_prompts.to(device, dtype)
        if uncond.shape != cond.shape:
            raise ValueError(
                f"{_where('sample_videos')}: negative_prompts {tuple(uncond.shape)} must match prompts {tuple(cond.shape)}"
            )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps, device=device)
    latents = initial_noise(seeds, (channels, frames, height, width)).to(device)
    for i, t in enumerate(scheduler.timesteps):
        timestep = t.expand(b)
        x = latents.to(dtype)
        velocity = model(x, timestep, cond, return_dict=False)[0].float()
        if uncond is not None:
            v_uncond = model(x, timestep, uncond, return_dict=False)[0].float()
            velocity = v_uncond + guidance_scale * (velocity - v_uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, t)
    return latents.clamp(-1.0, 1.0)


def checksum_input(data: SyntheticVideoConfig | None = None, sigma: float = 0.6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed small input of the weights checksum: (x_t float32 [1, 3, 2, 16, 16], timestep [1], prompt [1, L, D]).
    Small so that a CPU float32 forward takes well under a second."""
    base = data or SyntheticVideoConfig()
    small = SyntheticVideoConfig.from_dict({**base.to_dict(), "frames": 2, "height": 16, "width": 16})
    gen = SyntheticVideos(small)
    video, prompt = gen.batch(1, seed=0)
    noise = initial_noise([0], video.shape[1:])
    x_t = (1 - sigma) * video + sigma * noise
    return x_t, torch.tensor([1000.0 * sigma]), prompt


@torch.no_grad()
def checksum_summary(model: nn.Module, data: SyntheticVideoConfig | None = None) -> dict[str, float]:
    """A few summary numbers of the model's float32 output on ``checksum_input`` (device of the model)."""
    device, _ = _param_device_dtype(model)
    x_t, timestep, prompt = checksum_input(data)
    out = model(x_t.to(device), timestep.to(device), prompt.to(device), return_dict=False)[0].double().cpu()
    weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=torch.float64).view_as(out)
    return {
        "mean": float(out.mean()),
        "std": float(out.std()),
        "abs_mean": float(out.abs().mean()),
        "weighted_sum": float((out * weights).sum()),
        "first": float(out.flatten()[0]),
        "last": float(out.flatten()[-1]),
    }


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tokens_per_video(model_config: dict[str, Any], data: SyntheticVideoConfig) -> int:
    pt, ph, pw = model_config["patch_size"]
    return math.prod((data.frames // pt, data.height // ph, data.width // pw))
