"""Train the reference video DiT (qsparse_compiler/eval/reference_model.py) on synthetic moving-shape videos.

Flow matching as in Wan: x_t = (1 - s) x_0 + s * noise with s drawn logit-normal and shifted (shift 3, the
sampler's), the model predicts noise - x_0 at timestep 1000 s; MSE loss, AdamW, bf16 autocast, gradient clipping,
10% of prompts dropped to zeros (the "empty text" of classifier-free guidance). Training stops itself by wall clock
(``--minutes``), then saves everything under ``--out``:

    reference_dit.safetensors, reference_dit.json   the weights and config (copy both into
                                                     qsparse_compiler/eval/assets/ to commit them)
    loss.json, loss.png                              training loss (averaged per logged window) and held-out loss
    samples.png, samples_cfg.png                     sampled videos (every other row: the training data of the
                                                     same prompt), without and with guidance

Reproduce the committed weights (one H100, < 10 minutes including start-up and sampling; the committed run is
recorded in the json's "training" entry and in docs/reference_model/README.md):
    python examples/train_reference_model.py --out OUT --minutes 7.8 --lr 6e-4
A re-run gives an equivalent model, not bit-identical weights: the run stops by wall clock (the step count follows
the GPU's speed) and GPU attention backward is not deterministic.
CPU smoke test (tiny model, seconds):
    python examples/train_reference_model.py --out /tmp/ref --tiny --minutes 0.2
Samples from committed weights (no training):
    python examples/train_reference_model.py --out OUT --sample-only
Write the CPU float32 checksum of committed weights into their json (after copying them to assets/):
    python examples/train_reference_model.py --out unused --write-checksum
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qsparse_compiler.eval import plots
from qsparse_compiler.eval.reference_model import (
    ASSETS_DIR,
    CONFIG_NAME,
    DEFAULT_SHIFT,
    REFERENCE_MODEL_CONFIG,
    TINY_MODEL_CONFIG,
    build_reference_model,
    checksum_summary,
    data_config,
    load_reference_metadata,
    load_reference_model,
    parameter_count,
    sample_videos,
    save_reference_model,
    tokens_per_video,
)
from qsparse_compiler.eval.synthetic_video import SyntheticVideoConfig, SyntheticVideos

EVAL_SEED = 999_999  # held-out scenes; training uses seeds args.seed * 10**7 + step


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    warm = min(1.0, (step + 1) / max(args.warmup, 1))
    # Cosine from lr to lr/10 over the run; progress is the larger of the step and wall-clock fractions, so the
    # schedule ends where the run ends whichever limit comes first.
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def versions() -> dict[str, str]:
    import diffusers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
    return out


@torch.no_grad()
def heldout_loss(model, x0: torch.Tensor, prompt: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, amp: bool) -> float:
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp):
        pred = model(x_t, sigma * 1000, prompt, return_dict=False)[0]
    return float(F.mse_loss(pred.float(), noise - x0))


def write_samples(model, data: SyntheticVideos, out: Path, args: argparse.Namespace, device: torch.device) -> dict:
    """Sample ``args.samples`` held-out prompts with and without guidance; rows alternate data / generated."""
    c = data.config
    scenes = data.scenes_for_seeds([EVAL_SEED + i for i in range(args.samples)])
    truth, prompts = data.render(scenes), data.embed(scenes)
    record = {"prompts": data.describe(scenes), "seeds": list(range(args.samples)), "steps": args.sample_steps}
    for name, guidance in (("samples", 1.0), ("samples_cfg", args.guidance)):
        t0 = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            videos = sample_videos(
                model, prompts, list(range(args.samples)), frames=c.frames, height=c.height, width=c.width,
                num_steps=args.sample_steps, shift=DEFAULT_SHIFT, guidance_scale=guidance, device=device, dtype=torch.float32,
            )
        rows = torch.stack((truth.cpu(), videos.cpu()), 1).flatten(0, 1)
        plots.video_strip(rows, out / f"{name}.png", scale=2 if c.height >= 32 else 4)
        record[name] = {"guidance_scale": guidance, "seconds": round(time.time() - t0, 2),
                        "mse_vs_data": float(F.mse_loss(videos.cpu(), truth.cpu()))}
        print(f"[sample] {name}: guidance {guidance}, {record[name]['seconds']} s, mse vs data {record[name]['mse_vs_data']:.4f}", flush=True)
    return record


def train(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    budget = args.minutes * 60.0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    model_cfg = dict(TINY_MODEL_CONFIG if args.tiny else REFERENCE_MODEL_CONFIG)
    data_cfg = SyntheticVideoConfig(frames=args.frames or (4 if args.tiny else 16), height=args.height or (16 if args.tiny else 64),
                                    width=args.width or (16 if args.tiny else 64))
    data = SyntheticVideos(data_cfg, device=device)
    model = build_reference_model(model_cfg, seed=args.seed)
    # Zero the output projection: the first prediction is 0 and the loss starts at E|noise - x0|^2, a calm start
    # for a short run (the same idea as DiT's adaLN-zero).
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)
    model.to(device).train()
    n_params = parameter_count(model)
    n_tokens = tokens_per_video(model_cfg, data_cfg)
    print(f"[train] {n_params / 1e6:.2f} M parameters, {n_tokens} tokens per video, batch {args.batch}, device {device}", flush=True)
    forward = torch.compile(model) if args.compile else model

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99), eps=1e-8, fused=device.type == "cuda",
    )
    amp = device.type == "cuda"

    # Held-out batch: fixed scenes, noise and noise levels, so its loss is comparable across steps.
    ev_scenes = data.sample_scenes(8, EVAL_SEED)
    ev_x0, ev_prompt = data.render(ev_scenes), data.embed(ev_scenes)
    ev_noise = torch.randn(ev_x0.shape, generator=torch.Generator().manual_seed(EVAL_SEED)).to(device)
    ev_sigma = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.6, 0.8], device=device)

    log = {"step": [], "loss": [], "lr": [], "seconds": [], "eval_step": [], "eval_loss": []}
    window: list[torch.Tensor] = []
    step = 0
    gen = torch.Generator(device=device).manual_seed(args.seed)
    train_seconds = 0.0
    while step < args.max_steps:
        elapsed = time.time() - t_start
        if elapsed > budget:
            break
        if step % args.eval_every == 0:
            model.eval()
            log["eval_step"].append(step)
            log["eval_loss"].append(heldout_loss(forward, ev_x0, ev_prompt, ev_noise, ev_sigma, amp))
            model.train()
        lr = lr_at(step, max(step / args.max_steps, elapsed / budget), args)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, prompt = data.batch(args.batch, seed=args.seed * 10**7 + step)
        keep = (torch.rand(args.batch, 1, 1, device=device, generator=gen) >= args.prompt_dropout).float()
        prompt = prompt * keep
        sigma = torch.sigmoid(torch.randn(args.batch, device=device, generator=gen))
        sigma = shifted(sigma, args.train_shift)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = forward(x_t, sigma * 1000, prompt, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        window.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == 1:
            mean = float(torch.stack(window).mean())
            window.clear()
            now = time.time() - t_start
            log["step"].append(step)
            log["loss"].append(mean)
            log["lr"].append(lr)
            log["seconds"].append(round(now, 2))
            print(f"[train] step {step} loss {mean:.4f} lr {lr:.2e} grad {float(grad_norm):.2f} t {now:.0f}s", flush=True)
            # Checked only when logging: a per-step check would sync the GPU every step.
            if not math.isfinite(mean):
                raise RuntimeError(f"train_reference_model: loss became {mean} by step {step}; lower --lr")
    train_seconds = time.time() - t_start
    model.eval()
    log["eval_step"].append(step)
    log["eval_loss"].append(heldout_loss(forward, ev_x0, ev_prompt, ev_noise, ev_sigma, amp))
    print(f"[train] stopped after {step} steps, {train_seconds:.0f} s; held-out loss {log['eval_loss'][0]:.4f} -> {log['eval_loss'][-1]:.4f}", flush=True)

    # Save in the committed format, then reload it exactly as users will and sample from that.
    meta = {
        "data": data_cfg.to_dict(),
        "sampler": {"scheduler": "FlowMatchEulerDiscreteScheduler", "shift": DEFAULT_SHIFT, "num_steps": args.sample_steps,
                    "guidance_scale": args.guidance, "unconditional_prompt": "zeros"},
        "training": {
            "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "versions": versions(),
            "steps": step, "batch": args.batch, "seconds": round(train_seconds, 1), "lr": args.lr, "warmup": args.warmup,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "prompt_dropout": args.prompt_dropout,
            "timestep_sampling": f"logit-normal(0, 1), shifted by {args.train_shift}", "seed": args.seed,
            "parameters": n_params, "tokens_per_video": n_tokens,
            "final_train_loss": log["loss"][-1] if log["loss"] else None,
            "heldout_loss_first": log["eval_loss"][0], "heldout_loss_last": log["eval_loss"][-1],
        },
    }
    save_reference_model(model, out, meta)
    (out / "loss.json").write_text(json.dumps(log) + "\n")
    plots.line_plot({"train (window mean)": (log["step"], log["loss"]), "held-out": (log["eval_step"], log["eval_loss"])},
                    out / "loss.png", title=f"reference DiT flow-matching loss ({step} steps, {train_seconds:.0f} s)",
                    xlabel="step", ylabel="MSE", log_y=True)
    reloaded = load_reference_model(device, torch.float32, assets_dir=out)
    sample_record = write_samples(reloaded, data, out, args, device)
    # A float32 checksum on this device (TF32 off), for comparison with the CPU checksum the tests check.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta_file = out / CONFIG_NAME
    meta = json.loads(meta_file.read_text())
    meta["training"]["samples"] = sample_record
    meta["training"][f"checksum_{device.type}_fp32"] = checksum_summary(reloaded, data_cfg)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[done] wrote {sorted(p.name for p in out.iterdir())} in {time.time() - t_start:.0f} s", flush=True)


def sample_only(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    assets = Path(args.assets) if args.assets else ASSETS_DIR
    model = load_reference_model(device, torch.float32, assets_dir=assets)
    data = SyntheticVideos(data_config(load_reference_metadata(assets)), device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = write_samples(model, data, out, args, device)
    (out / "samples.json").write_text(json.dumps(record, indent=2) + "\n")


def write_checksum(args: argparse.Namespace) -> None:
    assets = Path(args.assets) if args.assets else ASSETS_DIR
    model = load_reference_model("cpu", torch.float32, assets_dir=assets)
    meta = load_reference_metadata(assets)
    meta["checksum"] = {"device": "cpu", "dtype": "float32", "input": "reference_model.checksum_input()",
                        **checksum_summary(model, data_config(meta))}
    (assets / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["checksum"], indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=7.8, help="training wall-clock budget (sampling and saving come after)")
    p.add_argument("--max-steps", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--train-shift", type=float, default=DEFAULT_SHIFT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy model and 4x16x16 videos (CPU smoke test)")
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--sample-only", action="store_true", help="only sample from committed (or --assets) weights")
    p.add_argument("--write-checksum", action="store_true", help="write the CPU fp32 checksum into the assets json")
    p.add_argument("--assets", default=None, help="weights folder for --sample-only/--write-checksum (default: the package's)")
    args = p.parse_args()
    if args.write_checksum:
        write_checksum(args)
    elif args.sample_only:
        sample_only(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
