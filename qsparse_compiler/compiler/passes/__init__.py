"""Graph passes over the Dynamo FX graph, run in this order by ``pass_manager.run_passes``.

One pass per file; see README.md in this folder for the invariants every pass keeps.
"""

from .apply_lora import ApplyLoRA
from .find_sites import FindSites
from .fuse_norm_quant import FuseNormQuant
from .fuse_qk_norm_rope import FuseQkNormRope
from .insert_residual_cache import InsertResidualCache
from .pass_manager import GraphPass, PassContext, run_passes
from .quantize_linears import QuantizeLinears
from .sparsify_attention import SparsifyAttention


def default_passes() -> list[GraphPass]:
    """The pipeline: analysis first, then the rewrites (each reads ``ctx.analysis`` written by ``find_sites``)."""
    return [FindSites(), QuantizeLinears(), ApplyLoRA(), SparsifyAttention(), InsertResidualCache(), FuseQkNormRope(),
            FuseNormQuant()]


__all__ = ["default_passes", "run_passes", "PassContext", "GraphPass", "FindSites", "QuantizeLinears", "ApplyLoRA",
           "SparsifyAttention", "InsertResidualCache", "FuseQkNormRope", "FuseNormQuant"]
