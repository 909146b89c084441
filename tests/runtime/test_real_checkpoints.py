"""Never slow silently, real checkpoints (issue #17 item 4): weights memory-mapped from safetensors, as diffusers'
from_pretrained loads them; save_pretrained after the dense weights are released; what from_pretrained needs."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qsparse_compiler as qs
from qsparse_compiler.eval.metrics import relative_error
from qsparse_compiler.eval.models import TEST_OPTIONS, tiny_wan


@pytest.mark.slow
def test_release_dense_weights_on_memory_mapped_weights(tmp_path):
    """Scenario 3: ``release_dense_weights`` on weights loaded by from_pretrained (memory-mapped safetensors) crashed
    with "Trying to resize storage that is not resizable", and ``save_pretrained`` afterwards failed inside
    safetensors. Now the mapped weights are released (the compiled model computes the same), and save_pretrained
    refuses with the fix."""
    tiny = tiny_wan(num_layers=1)
    save_file({name: p.detach().contiguous() for name, p in tiny.model.state_dict().items()},
              tmp_path / "model.safetensors")
    tiny.model.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True)
    assert not tiny.model.blocks[0].attn1.to_q.weight.untyped_storage().resizable()  # mapped, as from_pretrained
    inputs = tiny.make_inputs()
    torch._dynamo.reset()
    model = qs.optimize(tiny.model, options=TEST_OPTIONS, cache=False, regional=False, summary=False)
    with torch.no_grad():
        before = model(**inputs)[0]
        freed = qs.release_dense_weights(model)
        after = model(**inputs)[0]
    assert freed == sum(p.numel() * p.element_size() for name, p in tiny.model.named_parameters()
                        if name.startswith("blocks.0.") and name.endswith(".weight") and p.ndim == 2)
    assert tiny.model.blocks[0].attn1.to_q.weight.untyped_storage().nbytes() == 0
    assert relative_error(after, before) == 0.0
    with pytest.raises(RuntimeError, match="save_pretrained after release_dense_weights.*Save the dense model before"):
        tiny.model.save_pretrained(tmp_path / "saved")


def test_the_install_pulls_what_from_pretrained_needs():
    """Scenario 3: without accelerate, ``WanTransformer3DModel.from_pretrained`` fails ("low_cpu_mem_usage cannot be
    False when keep_in_fp32_modules is True"). accelerate is a dependency, pinned in the ``ci`` extra that
    ``make demo`` / ``make test`` install."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        pytest.importorskip("tomli")
        import tomli as tomllib
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert any(dep.startswith("accelerate>=") for dep in project["dependencies"])
    assert any(dep.startswith("accelerate==") for dep in project["optional-dependencies"]["ci"])
