"""Every Triton kernel reads only globals that compiled Triton accepts.

The interpreter (CI, TRITON_INTERPRET=1) lets a ``@triton.jit`` function read any module global; the compiler accepts
only ``tl.constexpr`` values, other jit functions and modules, and fails at the first launch on a GPU
("Cannot access global variable X from within @jit'ed function"). This scan finds such a read on the CPU: the names a
kernel loads that are neither its parameters nor its locals, resolved in its module.
"""

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest
import triton.language as tl

import qsparse_compiler.kernels as kernels_package


def _jit_functions():
    for info in pkgutil.iter_modules(kernels_package.__path__):
        module = importlib.import_module(f"{kernels_package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if isinstance(fn, types.FunctionType) and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                if fn.__module__ == module.__name__:  # defined here, not imported
                    yield f"{info.name}.{name}", obj, fn


def _free_global_loads(fn: types.FunctionType) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    function = tree.body[0]
    local = {a.arg for a in (*function.args.args, *function.args.kwonlyargs)}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            local.add(node.id)
    return {node.id for node in ast.walk(function)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local}


def _acceptable(value) -> bool:
    return (isinstance(value, (types.ModuleType, tl.constexpr)) or hasattr(value, "fn")
            or getattr(value, "__module__", "").startswith("triton"))


JIT_FUNCTIONS = sorted(_jit_functions(), key=lambda item: item[0])


def test_every_kernel_module_was_scanned():
    names = {name.split(".")[0] for name, _, _ in JIT_FUNCTIONS}
    assert {"attention_int8_fp8", "block_sparse_attention", "w4a8_gemm", "qk_norm_rope"} <= names


@pytest.mark.parametrize("name,jit,fn", JIT_FUNCTIONS, ids=[item[0] for item in JIT_FUNCTIONS])
def test_kernel_reads_only_constexpr_globals(name, jit, fn):
    bad = {global_name: type(fn.__globals__[global_name]).__name__
           for global_name in sorted(_free_global_loads(fn))
           if global_name in fn.__globals__ and not _acceptable(fn.__globals__[global_name])}
    assert not bad, (f"{name} reads module globals {bad} that compiled Triton refuses; make each a tl.constexpr "
                     "(X_JIT = tl.constexpr(X)) or pass it as a constexpr argument")
