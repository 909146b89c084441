"""Pure Triton kernels (one per file). Nothing here imports the rest of qsparse_compiler."""
