"""Synthetic videos of moving coloured shapes, with a "prompt" embedding that describes them.

The reference video DiT (``reference_model.py``) is trained on these; there is no VAE, so a video *is* the latent:
``float32 [B, C, T, H, W]`` in [-1, 1] with C = 3 (RGB, so a sample can be looked at directly).

A scene is a small set of discrete choices (the *descriptor*) plus continuous jitter:

    scene:   background colour (4), camera pan (static or one of 8 directions), number of objects (1..K)
    object:  shape (circle, square, triangle, cross, ring), colour (8), start cell of a 3x3 grid,
             motion (static or one of 8 directions; objects bounce off the borders), spin (ccw, none, cw),
             zoom (shrink, none, grow); objects are painted in slot order, so slot = depth
    jitter:  exact start position inside the cell, speed, size, start angle, texture phase (not in the prompt)

The prompt is a fixed random projection of the descriptor, the way a frozen text encoder maps words to vectors:
every attribute value has a fixed Gaussian vector (drawn once from ``vocab_seed``), and a token is the normalised
sum of its attributes' vectors:

    prompt  float32 [B, L_text, text_dim]
      token 0         scene: background + pan + object count
      token 1 + k     object k: shape + colour + cell + motion + spin + zoom + slot k   (zeros if absent)
      the rest        zeros (padding, like Wan's zero-padded T5 tokens)

An all-zero prompt is the unconditional ("empty text") prompt used for classifier-free guidance.

Everything is deterministic from a seed: descriptors and jitter come from a CPU ``torch.Generator`` (so CPU and
GPU draw the same scenes), rendering is vectorised torch arithmetic on the requested device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

__all__ = [
    "COLOURS",
    "MOTIONS",
    "SHAPES",
    "Scenes",
    "SyntheticVideoConfig",
    "SyntheticVideos",
]

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
_COLOUR_RGB = (
    (0.95, 0.15, 0.15),
    (0.15, 0.85, 0.25),
    (0.20, 0.35, 1.00),
    (0.95, 0.90, 0.15),
    (0.90, 0.20, 0.90),
    (0.15, 0.90, 0.95),
    (1.00, 0.55, 0.10),
    (0.95, 0.95, 0.95),
)
BACKGROUNDS = ("grey", "navy", "forest", "brown")
_BACKGROUND_RGB = ((0.22, 0.22, 0.22), (0.08, 0.10, 0.28), (0.07, 0.22, 0.10), (0.25, 0.15, 0.08))
# Index 0 is "static"; 1..8 are the compass directions counter-clockwise from "right" (image y grows downwards).
MOTIONS = ("static", "right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
CELLS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
SPINS = ("counter-clockwise", "no spin", "clockwise")
ZOOMS = ("shrinking", "steady", "growing")


@dataclass(frozen=True)
class SyntheticVideoConfig:
    """Video size and prompt format. The reference model is trained at the defaults (16 x 64 x 64 pixels, which
    the (1, 2, 2) patchify turns into 16 x 32 x 32 = 16,384 tokens)."""

    frames: int = 16
    height: int = 64
    width: int = 64
    channels: int = 3
    max_objects: int = 3
    text_len: int = 8
    text_dim: int = 64
    vocab_seed: int = 20261125
    # Motion magnitudes, in units of the frame height per frame (so they do not depend on the resolution).
    speed_range: tuple[float, float] = (0.014, 0.024)
    pan_speed: float = 0.012
    spin_rate: float = 0.12  # radians per frame
    zoom_rate: float = 0.03  # log-scale per frame
    radius_range: tuple[float, float] = (0.10, 0.15)

    def __post_init__(self) -> None:
        where = "qsparse_compiler.eval.SyntheticVideoConfig"
        if min(self.frames, self.height, self.width) < 1:
            raise ValueError(f"{where}: frames/height/width must be >= 1, got {self.frames}x{self.height}x{self.width}")
        if self.channels != 3:
            raise ValueError(f"{where}: channels must be 3 (RGB), got {self.channels}")
        if self.max_objects < 1 or self.text_len < 1 + self.max_objects:
            raise ValueError(
                f"{where}: text_len={self.text_len} must hold 1 scene token + max_objects={self.max_objects} object "
                f"tokens; raise text_len to at least {1 + self.max_objects}"
            )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SyntheticVideoConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**kwargs)


@dataclass(frozen=True)
class Scenes:
    """A batch of scene descriptors (discrete, in the prompt) and jitter (continuous, not in the prompt).

    Shapes: ``[B]`` for scene fields, ``[B, K]`` for object fields (K = max_objects), ``[B, K, 2]`` for offsets.
    """

    background: torch.Tensor  # long [B]
    pan: torch.Tensor  # long [B], index into MOTIONS
    present: torch.Tensor  # bool [B, K]
    shape: torch.Tensor  # long [B, K], index into SHAPES
    colour: torch.Tensor  # long [B, K], index into COLOURS
    cell: torch.Tensor  # long [B, K], index into CELLS
    motion: torch.Tensor  # long [B, K], index into MOTIONS
    spin: torch.Tensor  # long [B, K], index into SPINS
    zoom: torch.Tensor  # long [B, K], index into ZOOMS
    offset: torch.Tensor  # float [B, K, 2], start position jitter inside the cell, in cell units (-0.5, 0.5)
    speed: torch.Tensor  # float [B, K], frame heights per frame
    radius: torch.Tensor  # float [B, K], frame heights
    angle: torch.Tensor  # float [B, K], start angle in radians
    phase: torch.Tensor  # float [B, 2], background texture phase

    @property
    def batch_size(self) -> int:
        return int(self.background.shape[0])

    def to(self, device: torch.device | str) -> "Scenes":
        return Scenes(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: int | slice | list[int]) -> "Scenes":
        """A sub-batch (used to pair generated samples with the data of the same prompt)."""
        if isinstance(index, int):
            index = [index]
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


class SyntheticVideos:
    """Draws scenes, renders them as videos and embeds them as prompts.

    >>> data = SyntheticVideos(SyntheticVideoConfig(frames=4, height=16, width=16))
    >>> video, prompt = data.batch(2, seed=0)
    >>> tuple(video.shape), tuple(prompt.shape)
    ((2, 3, 4, 16, 16), (2, 8, 64))
    """

    def __init__(self, config: SyntheticVideoConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config or SyntheticVideoConfig()
        self.device = torch.device(device)
        c = self.config
        # The "vocabulary": one fixed Gaussian vector per attribute value. Drawn on the CPU from vocab_seed so that
        # every device and every run gets the same prompts.
        g = torch.Generator().manual_seed(c.vocab_seed)
        sizes = {
            "background": len(BACKGROUNDS),
            "pan": len(MOTIONS),
            "count": c.max_objects,
            "shape": len(SHAPES),
            "colour": len(COLOURS),
            "cell": len(CELLS),
            "motion": len(MOTIONS),
            "spin": len(SPINS),
            "zoom": len(ZOOMS),
            "slot": c.max_objects,
        }
        self.vocab = {name: torch.randn(n, c.text_dim, generator=g).to(self.device) for name, n in sizes.items()}
        self._colour_rgb = torch.tensor(_COLOUR_RGB, device=self.device)
        self._background_rgb = torch.tensor(_BACKGROUND_RGB, device=self.device)

    # ---------------------------------------------------------------- scenes
    def sample_scenes(self, batch_size: int, seed: int) -> Scenes:
        """Draw ``batch_size`` scenes, deterministic from ``seed`` and independent of the device.

        Video ``i`` is drawn from its own generator seeded with ``(seed, i)``, so a smaller batch with the same seed
        is a prefix of a larger one (``sample_scenes(2, s)`` == the first two of ``sample_scenes(8, s)``).
        """
        if batch_size < 1:
            raise ValueError(f"qsparse_compiler.eval.SyntheticVideos.sample_scenes: batch_size={batch_size} must be >= 1")
        return _cat_scenes([self._draw_one(int(seed) * 1_000_003 + i) for i in range(batch_size)]).to(self.device)

    def scenes_for_seeds(self, seeds: list[int]) -> Scenes:
        """One scene per seed (scene ``i`` equals ``sample_scenes(1, seeds[i])``): prompts for evaluation runs."""
        if not seeds:
            raise ValueError("qsparse_compiler.eval.SyntheticVideos.scenes_for_seeds: seeds must not be empty")
        return _cat_scenes([self._draw_one(int(s) * 1_000_003) for s in seeds]).to(self.device)

    def _draw_one(self, seed: int) -> Scenes:
        c = self.config
        g = torch.Generator().manual_seed(seed)
        k = c.max_objects

        def ints(high: int, *shape: int) -> torch.Tensor:
            return torch.randint(0, high, (1, *shape), generator=g)

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand((1, *shape), generator=g)

        count = int(torch.randint(1, k + 1, (1,), generator=g))
        return Scenes(
            background=ints(len(BACKGROUNDS)),
            pan=ints(len(MOTIONS)),
            present=(torch.arange(k) < count)[None],
            shape=ints(len(SHAPES), k),
            colour=ints(len(COLOURS), k),
            cell=ints(len(CELLS), k),
            motion=ints(len(MOTIONS), k),
            spin=ints(len(SPINS), k),
            zoom=ints(len(ZOOMS), k),
            offset=uniform(-0.35, 0.35, k, 2),
            speed=uniform(*c.speed_range, k),
            radius=uniform(*c.radius_range, k),
            angle=uniform(0.0, 2 * math.pi, k),
            phase=uniform(0.0, 1.0, 2),
        )

    def describe(self, scenes: Scenes) -> list[str]:
        """Human-readable prompts (what the embedding encodes), one per video."""
        out = []
        for i in range(scenes.batch_size):
            pan = MOTIONS[int(scenes.pan[i])]
            parts = [f"{BACKGROUNDS[int(scenes.background[i])]} background, " + ("still camera" if pan == "static" else f"camera pans {pan}")]
            for j in range(self.config.max_objects):
                if not bool(scenes.present[i, j]):
                    continue
                motion = MOTIONS[int(scenes.motion[i, j])]
                parts.append(
                    f"{COLOURS[int(scenes.colour[i, j])]} {SHAPES[int(scenes.shape[i, j])]} at {CELLS[int(scenes.cell[i, j])]}"
                    f" {'staying' if motion == 'static' else 'moving ' + motion}, {SPINS[int(scenes.spin[i, j])]},"
                    f" {ZOOMS[int(scenes.zoom[i, j])]}"
                )
            out.append("; ".join(parts))
        return out

    # ---------------------------------------------------------------- prompts
    def embed(self, scenes: Scenes) -> torch.Tensor:
        """float32 [B, L_text, text_dim]: the prompt tokens of each scene (see the module docstring)."""
        c, v = self.config, self.vocab
        b, k = scenes.batch_size, c.max_objects
        count = scenes.present.sum(1) - 1
        scene_tok = (v["background"][scenes.background] + v["pan"][scenes.pan] + v["count"][count]) / math.sqrt(3.0)
        slot = torch.arange(k, device=self.device).expand(b, k)
        obj_tok = (
            v["shape"][scenes.shape]
            + v["colour"][scenes.colour]
            + v["cell"][scenes.cell]
            + v["motion"][scenes.motion]
            + v["spin"][scenes.spin]
            + v["zoom"][scenes.zoom]
            + v["slot"][slot]
        ) / math.sqrt(7.0)
        obj_tok = obj_tok * scenes.present[..., None]
        prompt = torch.zeros(b, c.text_len, c.text_dim, device=self.device)
        prompt[:, 0] = scene_tok
        prompt[:, 1 : 1 + k] = obj_tok
        return prompt

    # ---------------------------------------------------------------- rendering
    def render(self, scenes: Scenes) -> torch.Tensor:
        """float32 [B, 3, T, H, W] in [-1, 1]. Coordinates are in frame heights (y in [0, 1], x in [0, W/H])."""
        c = self.config
        dev = self.device
        t = torch.arange(c.frames, device=dev, dtype=torch.float32)  # [T]
        aspect = c.width / c.height
        y = (torch.arange(c.height, device=dev, dtype=torch.float32) + 0.5) / c.height
        x = (torch.arange(c.width, device=dev, dtype=torch.float32) + 0.5) / c.height
        yy, xx = y[:, None], x[None, :]  # [H, 1], [1, W]
        pixel = 1.0 / c.height  # one pixel in frame heights: the anti-aliasing width

        # Background: a dim colour with a low-contrast 2D texture that scrolls against the pan (camera motion).
        pan_dir = _direction(scenes.pan)  # [B, 2] (dx, dy), zero for static
        shift = pan_dir[:, None, :] * c.pan_speed * t[None, :, None]  # [B, T, 2]
        period = 0.25
        tx = xx[None, None] + shift[..., 0, None, None] + scenes.phase[:, 0, None, None, None]  # [B, T, 1, W]
        ty = yy[None, None] + shift[..., 1, None, None] + scenes.phase[:, 1, None, None, None]  # [B, T, H, 1]
        texture = torch.sin(2 * math.pi * tx / period) * torch.sin(2 * math.pi * ty / period)  # [B, T, H, W]
        base = self._background_rgb[scenes.background]  # [B, 3]
        frame = base[:, :, None, None, None] * (1.0 + 0.35 * texture[:, None])  # [B, 3, T, H, W]

        # Objects: centre path (bouncing), angle and scale per frame.
        cell = scenes.cell
        cx0 = ((cell % 3).float() + 0.5 + scenes.offset[..., 0]) / 3 * aspect  # [B, K]
        cy0 = ((cell // 3).float() + 0.5 + scenes.offset[..., 1]) / 3
        velocity = _direction(scenes.motion) * scenes.speed[..., None]  # [B, K, 2]
        margin = scenes.radius
        cx = _bounce(cx0[..., None] + velocity[..., 0, None] * t, margin[..., None], aspect - margin[..., None])
        cy = _bounce(cy0[..., None] + velocity[..., 1, None] * t, margin[..., None], 1.0 - margin[..., None])
        spin = (scenes.spin - 1).float()  # -1 ccw, 0, +1 cw (image y points down, so + is clockwise on screen)
        zoom = (scenes.zoom - 1).float()
        angle = scenes.angle[..., None] + spin[..., None] * c.spin_rate * t  # [B, K, T]
        radius = scenes.radius[..., None] * torch.exp(zoom[..., None] * c.zoom_rate * t)  # [B, K, T]

        colours = self._colour_rgb[scenes.colour]  # [B, K, 3]
        for j in range(c.max_objects):  # painter's order: later slots are in front
            dx = xx[None, None] - cx[:, j, :, None, None]  # [B, T, 1, W] -> broadcast [B, T, H, W]
            dy = yy[None, None] - cy[:, j, :, None, None]
            cos = torch.cos(angle[:, j])[..., None, None]
            sin = torch.sin(angle[:, j])[..., None, None]
            r = radius[:, j, :, None, None]
            # Object-local coordinates in units of the object's radius.
            u = (cos * dx + sin * dy) / r
            w = (-sin * dx + cos * dy) / r
            sdf = _shape_sdf(u, w, scenes.shape[:, j]) * r  # signed distance in frame heights, < 0 inside
            alpha = (0.5 - sdf / pixel).clamp(0.0, 1.0) * scenes.present[:, j, None, None, None]
            alpha = alpha[:, None]  # [B, 1, T, H, W]
            frame = frame * (1.0 - alpha) + colours[:, j, :, None, None, None] * alpha
        return (frame * 2.0 - 1.0).clamp(-1.0, 1.0)

    def batch(self, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(video float32 [B, 3, T, H, W] in [-1, 1], prompt float32 [B, L_text, text_dim]) for ``seed``."""
        scenes = self.sample_scenes(batch_size, seed)
        return self.render(scenes), self.embed(scenes)


def _cat_scenes(parts: list[Scenes]) -> Scenes:
    return Scenes(**{f.name: torch.cat([getattr(p, f.name) for p in parts], 0) for f in fields(Scenes)})


def _direction(index: torch.Tensor) -> torch.Tensor:
    """Unit (dx, dy) for a MOTIONS index (0 = static -> zero vector); image y grows downwards, so "up" is -y."""
    theta = (index - 1).float() * (math.pi / 4)
    moving = (index > 0).float()
    return torch.stack((torch.cos(theta), -torch.sin(theta)), dim=-1) * moving[..., None]


def _bounce(pos: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Reflect ``pos`` into [low, high] as a ball bouncing between two walls (a triangle wave)."""
    span = (high - low).clamp_min(1e-6)
    z = torch.remainder(pos - low, 2 * span)
    return low + span - (z - span).abs()


def _box_sdf(u: torch.Tensor, w: torch.Tensor, bx: float, by: float) -> torch.Tensor:
    qx, qy = u.abs() - bx, w.abs() - by
    outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2)
    inside = torch.maximum(qx, qy).clamp_max(0)
    return outside + inside


def _shape_sdf(u: torch.Tensor, w: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Signed distance (in object radii) of every shape type, selected per video by ``shape`` (long [B])."""
    rho = torch.sqrt(u * u + w * w)
    circle = rho - 1.0
    square = _box_sdf(u, w, 0.8, 0.8)
    # Equilateral triangle: the max over its three edge half-planes (inradius 0.5, circumradius 1). Edge normals
    # at 90, 210 and 330 degrees in y-up coordinates; w points down, hence the minus sign.
    edges = [math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    triangle = torch.stack([math.cos(a) * u - math.sin(a) * w for a in edges], 0).amax(0) - 0.5
    cross = torch.minimum(_box_sdf(u, w, 1.0, 0.32), _box_sdf(u, w, 0.32, 1.0))
    ring = (rho - 0.72).abs() - 0.28
    stacked = torch.stack((circle, square, triangle, cross, ring), 0)  # [5, B, T, H, W]
    index = shape.view(1, -1, 1, 1, 1).expand(1, *u.shape)
    return stacked.gather(0, index)[0]
