"""moe_lab: the Mixture-of-Experts library behind the MoE Lab course.

One module per concept: ``routing`` (softmax / sigmoid gating, group-limited top-k), ``losses`` (aux / z / CV² /
DeepSeek balance losses, the bias update), ``metrics`` (load, MaxVio, entropy, drops, devices per token),
``experts`` (stacked expert FFNs, grouped GEMM), ``dispatch`` (capacity; loop / sorted / one-hot), ``permute``
(deterministic gather / combine), ``config`` (``MoEConfig``), ``layer`` (``MoELayer``), ``bias_balancing``
(aux-loss-free balancing), ``parallel`` (expert parallelism), ``launch`` (local worker processes), ``timing`` (step timer),
``cost_model`` (bytes, alpha-beta time, memory per rank), ``calculator`` (parameters / FLOPs / memory),
``model`` / ``data`` / ``train`` / ``hooks`` (a small MoE transformer and its training loop),
``balancing`` (the collapse experiment), ``widgets`` (notebook dashboards), ``checks`` (graded exercises),
``course`` (build tools), ``grading`` (``moe-lab grade``), ``bench`` (``python -m moe_lab.bench``).
"""
from .config import MoEConfig
from .experts import FFN, Experts
from .layer import MoELayer, RoutingInfo
from .routing import Router, sigmoid_topk, softmax_topk
from .utils import default_device, seed_everything

__all__ = ["FFN", "Experts", "MoEConfig", "MoELayer", "Router", "RoutingInfo", "default_device", "seed_everything",
           "sigmoid_topk", "softmax_topk"]
__version__ = "0.1.0"
