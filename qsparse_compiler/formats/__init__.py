"""The bottom layer: data formats and their math, importing nothing else of the package.

- ``quantization``: the int4 weight storage format (``PackedInt4Weight``: codes, scales, group size), its packing and
  the 8-bit activation formats, as plain torch (the references every kernel is checked against).
- ``layout``: ``BlockSparseLayout`` (the one layout type: kv_num_blocks [B, H, QB], kv_indices [B, H, QB, KVB]),
  union/intersection, ASCII view, ``bitmap_to_blocks`` (sync-free bitmap -> layout tensors).
- ``patterns``: static patterns over the 3D video token grid (diagonal ``local_3d``, ``multi_diagonal``,
  ``vertical_stripe``, ``skip``; ``random_blocks`` for tests and benchmarks).
- ``pattern_spec``: the registry of patterns by name and the spec parser (``"local3d:0.15;dense"``).
"""
