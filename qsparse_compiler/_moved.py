"""Old import paths of the modules that moved when the package was layered (CHANGELOG.md, 0.2.0).

Each old module is the new module under its old name (the same object: attributes, monkeypatching and
``isinstance`` all agree), imported with a DeprecationWarning that names the new path. They go away in 0.3.0.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "alias"]

# Old import path -> where it lives now. tools/import_graph.py reads this table: nothing in the package may import an
# old path.
MOVED = {
    "qsparse_compiler.backend": "qsparse_compiler.compiler.backend",
    "qsparse_compiler.ops.quantization": "qsparse_compiler.formats.quantization",
    "qsparse_compiler.runtime.context": "qsparse_compiler.ops.context",
    "qsparse_compiler.sparsity": "qsparse_compiler.formats",
    "qsparse_compiler.sparsity.layout": "qsparse_compiler.formats.layout",
    "qsparse_compiler.sparsity.patterns": "qsparse_compiler.formats.patterns",
    "qsparse_compiler.sparsity.dynamic": "qsparse_compiler.ops.dynamic_layout",
    "qsparse_compiler.testing": "qsparse_compiler.eval",
    "qsparse_compiler.testing.fidelity": "qsparse_compiler.eval.fidelity",
    "qsparse_compiler.testing.metrics": "qsparse_compiler.eval.metrics",
    "qsparse_compiler.testing.models": "qsparse_compiler.eval.models",
    "qsparse_compiler.testing.plots": "qsparse_compiler.eval.plots",
    "qsparse_compiler.testing.reference_model": "qsparse_compiler.eval.reference_model",
    "qsparse_compiler.testing.synthetic_video": "qsparse_compiler.eval.synthetic_video",
}


def alias(old: str) -> ModuleType:
    """Make the module ``old`` (being imported) the module that ``MOVED`` says it moved to."""
    new = MOVED[old]
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes away in qsparse_compiler 0.3.0)",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
