"""The video token grid after patchify, the one computation behind qs.optimize's per-forward grid, calibration's
attention grids and the benchmarks' token counts."""

import pytest
import torch

from qsparse_compiler.ops.context import latent_grid, patchified_grid
from qsparse_compiler.eval.models import tiny_cogvideox, tiny_hunyuan, tiny_wan


@pytest.mark.parametrize("factory, latents, grid", [
    (tiny_wan, (1, 4, 5, 16, 32), (5, 8, 16)),  # patch (1, 2, 2), (B, C, F, H, W)
    (tiny_hunyuan, (1, 4, 3, 16, 32), (3, 8, 16)),  # patch_size 2, patch_size_t 1
    (tiny_cogvideox, (1, 3, 4, 16, 32), (3, 8, 16)),  # patch_size 2, no temporal patch, (B, F, C, H, W)
], ids=["wan", "hunyuan", "cogvideox"])
def test_grid_of_each_architecture(factory, latents, grid):
    model = factory().model
    assert latent_grid(model, torch.zeros(latents)) == grid
    assert patchified_grid(dict(model.config), latents, frames_first=factory is tiny_cogvideox) == grid


def test_released_configs_as_plain_dicts():
    """The benchmarks' workloads are config dicts, not models: Wan-1.3B and HunyuanVideo at 480p x 81 frames."""
    assert patchified_grid({"patch_size": [1, 2, 2]}, (1, 16, 21, 60, 104)) == (21, 30, 52)
    assert patchified_grid({"patch_size": 2, "patch_size_t": 1}, (1, 16, 21, 60, 104)) == (21, 30, 52)


def test_a_model_without_a_patch_size_or_5d_latents_is_named():
    with pytest.raises(ValueError, match=r"need a config with patch_size and 5-D latents, got patch_size=None"):
        latent_grid(torch.nn.Linear(2, 2), torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"latents \(1, 64, 4\)"):
        latent_grid(tiny_wan(num_layers=1).model, torch.zeros(1, 64, 4))
