"""``python -m qsparse_compiler ...`` is the ``qsparse`` command."""

from .cli import main

main()
