"""Hugging Face's Mixtral sparse MoE block with the weights of a ``moe_lab`` layer: the peer in the benchmark.

``transformers`` is a test dependency of the course, not a runtime one: :func:`unavailable` says why a row
cannot run (no ``transformers``, no such experts implementation in the installed version, GELU experts) and
the benchmark prints that reason instead of the row.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layer import MoELayer

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm")  # benchmark rows hf_eager, hf_grouped_mm


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def _experts_interface():
    """transformers >= 5's registry of experts implementations (None for 4.x or without transformers)."""
    if _transformers() is None:
        return None
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return None
    return ALL_EXPERTS_FUNCTIONS


def experts_implementations() -> tuple[str, ...]:
    """The experts implementations the installed ``transformers`` offers for Mixtral (``()`` when absent).

    transformers >= 5 stores the experts as 3-D tensors and dispatches on ``config._experts_implementation``
    (``"eager"``: a loop over the experts that got tokens; ``"grouped_mm"``: sort + ``torch``'s grouped GEMM,
    ...); 4.x has one ``nn.Linear`` triple per expert and only the eager loop.
    """
    if _transformers() is None:
        return ()
    interface = _experts_interface()
    return ("eager", *(name for name in EXPERTS_IMPLEMENTATIONS[1:] if interface is not None and name in interface))


def unavailable(experts_implementation: str, activation: str = "swiglu") -> str | None:
    """Why the HF row for ``experts_implementation`` cannot run here, or None when it can."""
    if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}, "
                         f"got {experts_implementation!r}")
    transformers = _transformers()
    if transformers is None:
        return "skipped: transformers is not installed (pip install transformers; it is in requirements.txt)"
    if activation != "swiglu":
        return f"skipped: Mixtral's block has SwiGLU experts only, not {activation}"
    if experts_implementation not in experts_implementations():
        return (f"skipped: transformers {transformers.__version__} has no {experts_implementation!r} "
                "experts implementation")
    return None


class HFBlock(nn.Module):
    """``MixtralSparseMoeBlock`` on ``x: [T, d_model]`` -> ``[T, d_model]`` (it wants ``[batch, seq, d]``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)  # 4.x also returns router logits


def mixtral_block(layer: MoELayer, experts_implementation: str = "eager") -> HFBlock:
    """A Hugging Face Mixtral block computing what ``layer`` computes (same router and expert weights, in the
    experts' dtype and device). ``layer``: a dropless SwiGLU :class:`MoELayer` with Mixtral's gating (its
    defaults)."""
    reason = unavailable(experts_implementation, layer.experts.activation)
    if reason:
        raise ValueError(reason.removeprefix("skipped: "))
    if layer.capacity_factor is not None or layer.router_type != "softmax" or layer.softmax_order != "before_topk" \
            or not layer.renormalize:
        raise ValueError("layer must be dropless with Mixtral's gating (softmax router, softmax before top-k, "
                         "renormalised)")
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts = layer.experts
    options = {} if _experts_interface() is None else {"experts_implementation": experts_implementation}
    config = transformers.MixtralConfig(hidden_size=layer.d_model, intermediate_size=experts.d_ff,
                                        num_local_experts=layer.num_experts, num_experts_per_tok=layer.k,
                                        router_jitter_noise=0.0, **options)
    block = MixtralSparseMoeBlock(config).to(experts.w1.device, experts.w1.dtype).eval()
    state = dict(block.named_parameters())
    with torch.no_grad():
        state["gate.weight"].copy_(layer.router.weight)
        if "experts.gate_up_proj" in state:  # transformers >= 5: [E, 2 d_ff, d] and [E, d, d_ff]
            state["experts.gate_up_proj"].copy_(torch.cat([experts.w1, experts.w3], dim=-1).transpose(1, 2))
            state["experts.down_proj"].copy_(experts.w2.transpose(1, 2))
        else:  # transformers 4.x: nn.Linear per expert, weights [out, in]
            for e, expert in enumerate(block.experts):
                expert.w1.weight.copy_(experts.w1[e].T)
                expert.w3.weight.copy_(experts.w3[e].T)
                expert.w2.weight.copy_(experts.w2[e].T)
    return HFBlock(block)
