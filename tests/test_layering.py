"""The package's layers import downward only: no import cycle between subpackages, at module level or inside a
function (tools/import_graph.py reads every import statement from the source), and nothing imports an old path."""

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = import_graph  # dataclasses resolve their module by name
_spec.loader.exec_module(import_graph)


def test_no_import_cycle_between_layers():
    graph = import_graph.build(ROOT / "qsparse_compiler")
    assert graph.cycles() == [], import_graph.render(graph)
    assert graph.upward() == [], import_graph.render(graph)
    assert graph.old_path_imports == [], import_graph.render(graph)
    # every layer the package has is ranked (a new subpackage gets a place in LAYERS)
    assert graph.layers <= set(import_graph.LAYERS), graph.layers - set(import_graph.LAYERS)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "qsparse_compiler"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "in-function"])
def test_a_cycle_is_found(tmp_path, deferred):
    back = "def f():\n    from ..ops import a\n" if deferred else "from ..ops import a\n"
    root = _package(tmp_path, {
        "ops/__init__.py": "", "ops/a.py": "from ..formats import b\n",
        "formats/__init__.py": "", "formats/b.py": "", "formats/c.py": back,
    })
    graph = import_graph.build(root)
    assert graph.cycles() == [["formats", "ops"]]
    assert [(src, dst) for src, dst, _ in graph.upward()] == [("formats", "ops")]
    assert graph.edges[("formats", "ops")].in_function == int(deferred)


def test_cycles_through_three_layers_and_absolute_imports(tmp_path):
    root = _package(tmp_path, {
        "ops.py": "import qsparse_compiler.compiler\n", "plan.py": "from . import ops\n",
        "compiler/__init__.py": "def f():\n    from qsparse_compiler.plan import x\n",
    })
    assert import_graph.build(root).cycles() == [["compiler", "ops", "plan"]]


def test_old_paths_are_aliases_of_the_new_modules():
    from qsparse_compiler._moved import MOVED

    for old, new in MOVED.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(old)
        if old == "qsparse_compiler.testing":  # the package holding the aliases
            continue
        if old == "qsparse_compiler.sparsity":  # names re-exported from two places
            assert module.BlockSparseLayout is importlib.import_module(new).layout.BlockSparseLayout
            assert module.dynamic_topk_layout is importlib.import_module("qsparse_compiler.ops.dynamic_layout").dynamic_topk_layout
        else:
            assert module is importlib.import_module(new), old


def test_the_script_prints_the_graph():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cycles: 0" in result.stdout and "formats      -> -" in result.stdout
