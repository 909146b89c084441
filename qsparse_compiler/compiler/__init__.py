"""The ``quantsparse`` torch.compile backend: the entry point (``backend``) and the graph passes (``passes``).

It sits above ``ops`` (the ``qsparse::`` ops it inserts), ``plan`` (what a calibrated plan says) and ``runtime``
(the packed-weight store and residual-cache state its compiled graphs read at call time). ``qs.optimize``
(runtime/pipeline.py) reaches it as users do, through ``torch.compile(..., backend="quantsparse")``, never by import;
calibration, evaluation and the CLI sit above it (``python tools/import_graph.py`` prints the layers).
"""
