"""``Session``: everything compiled models read and write at run time, owned in one place.

A session holds
- ``weights``: the packed int4 weights of every quantized linear (``PackedWeightStore``, keyed weakly by parameter),
- ``lora``: a plan's timestep-aware LoRA tensors on their device (``LoraStore``, keyed weakly by parameter),
- ``cache``: the residual caches and the denoising-step clock (``ResidualCacheRuntime``, keyed by attention FQN and
  the model that owns the site),
- ``reports``: the rewrite report of every graph compiled into it, oldest first.

Give each model its own and two compiled models share nothing:

    session = qs.Session()
    model = torch.compile(model, backend="quantsparse", options={"session": session})

Options without a session use the process's default session (``default_session()``), which is what
``qsparse_compiler.compiler.backend.reports()`` and ``qs.release_dense_weights`` read; an explicit ``runtime``
option still names the residual-cache runtime of a model that otherwise uses its session's stores. Sessions hold
no strong reference to a model: entries die with their parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .residual_cache import ResidualCacheRuntime, default_runtime
from .weights import LoraStore, PackedWeightStore, default_store, lora_store

__all__ = ["Session", "default_session"]


@dataclass(eq=False)
class Session:
    weights: PackedWeightStore = field(default_factory=PackedWeightStore)
    lora: LoraStore = field(default_factory=LoraStore)
    cache: ResidualCacheRuntime = field(default_factory=ResidualCacheRuntime)
    reports: list[Any] = field(default_factory=list)  # compiler.passes.report.RewriteReport, oldest first

    def release_dense_weights(self, model: Any) -> int:
        """Free the dense storage of every parameter of ``model`` that has packed weights in this session; returns the
        bytes freed (see ``PackedWeightStore.release_dense``)."""
        return self.weights.release_dense(model)


# The stores of the default session are the process-wide ones the runtime modules define (default_store, lora_store,
# default_runtime), so code that reaches them directly keeps seeing the same state.
_DEFAULT = Session(weights=default_store, lora=lora_store, cache=default_runtime)


def default_session() -> Session:
    """The session of every graph compiled without ``options={"session": ...}``."""
    return _DEFAULT
