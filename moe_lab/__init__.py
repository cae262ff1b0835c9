"""moe_lab: the Mixture-of-Experts library behind the MoE Lab course.

One module per concept: ``routing`` (gating), ``losses`` (aux / z-loss), ``metrics`` (load, MaxVio, entropy),
``experts`` (stacked expert FFNs, grouped GEMM), ``dispatch`` (loop / sorted / one-hot), ``layer``
(``MoELayer``), ``widgets`` (notebook dashboards), ``checks`` (graded exercises), ``course`` (build tools).
"""
from .experts import FFN, Experts
from .layer import MoELayer, RoutingInfo
from .routing import Router, softmax_topk
from .utils import default_device, seed_everything

__all__ = ["FFN", "Experts", "MoELayer", "Router", "RoutingInfo", "default_device", "seed_everything", "softmax_topk"]
__version__ = "0.1.0"
