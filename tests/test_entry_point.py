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
        from qsparse_compiler.backend import reports
        assert len(reports()) == 1, reports()
        print("OK", len(reports()[0].sites))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 1" in result.stdout
