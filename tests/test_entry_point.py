"""backend="quantsparse" resolves through the torch_dynamo_backends entry point in a fresh interpreter."""

import subprocess
import sys
import textwrap


def test_backend_works_without_importing_the_package():
    script = textwrap.dedent(
        """
        import sys, torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        x = torch.randn(2, 8)
        assert "qsparse_compiler" not in sys.modules
        with torch.no_grad():
            out = torch.compile(model, backend="quantsparse")(x)
            assert torch.allclose(out, model(x), atol=1e-6)
        from qsparse_compiler.compiler.backend import reports
        assert len(reports()) == 1, reports()
        print("OK", len(reports()[0].sites))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 1" in result.stdout


def test_importing_the_package_registers_the_backend_without_an_entry_point():
    """A source checkout on PYTHONPATH has no entry point: the import must register the backend itself."""
    script = textwrap.dedent(
        """
        import importlib.metadata, sys, torch
        # Hide the installed entry point, as on a machine where the package is only on PYTHONPATH.
        real = importlib.metadata.entry_points

        def hidden(**kw):
            found = real(**kw)
            if kw.get("group") != "torch_dynamo_backends":
                return found
            return importlib.metadata.EntryPoints([e for e in found if e.name != "quantsparse"])

        importlib.metadata.entry_points = hidden
        import qsparse_compiler
        from torch._dynamo.backends.registry import lookup_backend
        assert lookup_backend("quantsparse") is qsparse_compiler.compiler.backend.quantsparse
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
