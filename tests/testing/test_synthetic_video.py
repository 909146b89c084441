import dataclasses

import pytest
import torch

from qsparse_compiler.eval.synthetic_video import Scenes, SyntheticVideoConfig, SyntheticVideos

SMALL = SyntheticVideoConfig(frames=6, height=24, width=32)


def test_batch_shapes_and_range():
    video, prompt = SyntheticVideos(SMALL).batch(3, seed=7)
    assert video.shape == (3, 3, 6, 24, 32) and video.dtype == torch.float32
    assert prompt.shape == (3, SMALL.text_len, SMALL.text_dim)
    assert float(video.min()) >= -1.0 and float(video.max()) <= 1.0
    # Not a blank canvas: bright shapes on dark backgrounds span most of the range.
    assert float(video.max() - video.min()) > 1.0


def test_deterministic_from_seed_and_prefix_stable():
    a_video, a_prompt = SyntheticVideos(SMALL).batch(4, seed=11)
    b_video, b_prompt = SyntheticVideos(SMALL).batch(4, seed=11)
    assert torch.equal(a_video, b_video) and torch.equal(a_prompt, b_prompt)
    c_video, c_prompt = SyntheticVideos(SMALL).batch(2, seed=11)
    assert torch.equal(a_video[:2], c_video) and torch.equal(a_prompt[:2], c_prompt)
    d_video, _ = SyntheticVideos(SMALL).batch(4, seed=12)
    assert not torch.equal(a_video, d_video)


def test_scenes_for_seeds_matches_single_draws():
    gen = SyntheticVideos(SMALL)
    both = gen.scenes_for_seeds([3, 9])
    assert torch.equal(gen.render(both)[1:], gen.render(gen.sample_scenes(1, 9)))
    assert torch.equal(gen.embed(both)[:1], gen.embed(gen.sample_scenes(1, 3)))


def test_prompt_encodes_descriptor_not_jitter():
    gen = SyntheticVideos(SMALL)
    s = gen.sample_scenes(2, seed=5)
    jittered = dataclasses.replace(s, offset=s.offset.flip(0), speed=s.speed * 1.1, radius=s.radius * 0.9, angle=s.angle + 1.0)
    assert torch.equal(gen.embed(s), gen.embed(jittered))
    assert not torch.equal(gen.render(s), gen.render(jittered))
    recoloured = dataclasses.replace(s, colour=(s.colour + 1) % 8)
    diff = (gen.embed(s) - gen.embed(recoloured)).abs().sum(-1)  # [B, L]
    # Exactly the tokens of present objects change; the scene token and padding do not.
    assert torch.equal(diff[:, 1:4] > 0, s.present)
    assert float(diff[:, 0].abs().max()) == 0.0 and float(diff[:, 4:].abs().max()) == 0.0
    assert len(gen.describe(s)) == 2 and all("background" in p for p in gen.describe(s))


def _one_object_scene(motion: int, spin: int = 1, zoom: int = 1, pan: int = 0) -> Scenes:
    i = lambda v: torch.tensor([v])  # noqa: E731
    return Scenes(
        background=i(0), pan=i(pan), present=torch.tensor([[True, False, False]]), shape=torch.tensor([[1, 0, 0]]),
        colour=torch.tensor([[0, 0, 0]]), cell=torch.tensor([[4, 0, 0]]), motion=torch.tensor([[motion, 0, 0]]),
        spin=torch.tensor([[spin, 1, 1]]), zoom=torch.tensor([[zoom, 1, 1]]), offset=torch.zeros(1, 3, 2),
        speed=torch.full((1, 3), 0.02), radius=torch.full((1, 3), 0.12), angle=torch.zeros(1, 3), phase=torch.zeros(1, 2),
    )


def test_still_scene_is_still_and_motion_moves():
    gen = SyntheticVideos(SMALL)
    still = gen.render(_one_object_scene(motion=0))
    assert torch.equal(still[:, :, 0], still[:, :, -1])
    moving = gen.render(_one_object_scene(motion=1))  # "right"
    red = (moving[0, 0] > 0.5) & (moving[0, 1] < -0.5)  # red object pixels, [T, H, W]
    cols = torch.arange(SMALL.width).float()
    centre_x = [(red[t].float().sum(0) * cols).sum() / red[t].sum() for t in (0, SMALL.frames - 1)]
    assert float(centre_x[1] - centre_x[0]) > 1.5  # moved right by ~ 0.02 * 5 frames * 24 px = 2.4 px
    panned = gen.render(_one_object_scene(motion=0, pan=3))
    assert not torch.equal(panned[:, :, 0], panned[:, :, -1])


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="text_len"):
        SyntheticVideoConfig(text_len=3, max_objects=3)
    with pytest.raises(ValueError, match="channels"):
        SyntheticVideoConfig(channels=4)
    assert SyntheticVideoConfig.from_dict(SMALL.to_dict()) == SMALL
