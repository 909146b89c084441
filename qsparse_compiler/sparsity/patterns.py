"""Moved to ``qsparse_compiler.formats.patterns``; this old path goes away in 0.3.0 (CHANGELOG.md)."""

from .._moved import alias

alias(__name__)
