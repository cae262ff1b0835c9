"""moe_lab: the Mixture-of-Experts library behind the MoE Lab course.

One module per concept: ``routing`` (gating), ``losses`` (aux / z / CV² losses), ``metrics`` (load, MaxVio,
entropy, drops), ``experts`` (stacked expert FFNs, grouped GEMM), ``dispatch`` (capacity; loop / sorted / one-hot),
``permute`` (deterministic gather / combine), ``layer`` (``MoELayer``), ``parallel`` (expert parallelism),
``launch`` (local worker processes), ``timing`` (step timer), ``cost_model`` (bytes, alpha-beta time, memory per rank),
``calculator`` (parameters / FLOPs / memory), ``model`` / ``data`` / ``train`` (a small MoE transformer),
``balancing`` (the collapse experiment), ``widgets`` (notebook dashboards), ``checks`` (graded exercises),
``course`` (build tools), ``grading`` (``moe-lab grade``), ``bench`` (``python -m moe_lab.bench``).
"""
from .experts import FFN, Experts
from .layer import MoELayer, RoutingInfo
from .routing import Router, softmax_topk
from .utils import default_device, seed_everything

__all__ = ["FFN", "Experts", "MoELayer", "Router", "RoutingInfo", "default_device", "seed_everything", "softmax_topk"]
__version__ = "0.1.0"
