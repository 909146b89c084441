"""Moved to ``qsparse_compiler.eval`` (evaluation: fidelity, synthetic video, reference model, plots, tiny models);
the modules under this old path are aliases of theirs and go away in 0.3.0 (CHANGELOG.md)."""
