"""Evaluation (was ``qsparse_compiler.testing``): tiny and reference models, synthetic video, fidelity metrics and
the ablation harness, plots. It sits on top of everything but the CLI; nothing below imports it."""
