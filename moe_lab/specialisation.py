"""Expert specialisation: which kinds of token each expert gets, and when routing stops changing.

Token classes of byte-level Python source (:data:`TOKEN_CLASSES`), the class x expert statistics of a routing
(``P(expert | class)`` and the mutual information between class and expert), and OLMoE's router saturation
(Muennighoff et al. 2024, Sec. 5: the share of a checkpoint's top-k experts that the final model also picks).
Shapes: ``N`` tokens, ``C`` classes, ``E`` experts, ``k`` experts per token, ``L`` MoE layers.
"""
from __future__ import annotations

import keyword
import re
import string

import torch

from .hooks import TrainHook, TrainState
from .routing import check_experts
from .validation import check_int, check_tensor, check_type, reads_values

TOKEN_CLASSES = ("letter", "digit", "whitespace", "punctuation", "keyword", "other")
"""Class names of :func:`token_classes` (class id = index): ASCII letters, digits, whitespace, punctuation
(``string.punctuation``, the underscore included), every byte of a Python keyword, and anything else."""

_WORD = re.compile(rb"[A-Za-z0-9_]+")
_KEYWORDS = frozenset(w.encode() for w in keyword.kwlist)


def token_classes(tokens: torch.Tensor) -> torch.Tensor:
    """Class id (index into :data:`TOKEN_CLASSES`) of every byte. tokens: ``[N]`` ints in ``[0, 256)`` -> ``[N]``
    int64. A byte is ``keyword`` when its maximal run of ``[A-Za-z0-9_]`` bytes is a Python keyword
    (``keyword.kwlist``: ``if`` and ``elif`` are, ``classify``, ``_if`` and ``if2`` are not)."""
    check_tensor("tokens", tokens, "[N] (byte ids)", 1, kind="int")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > 255):
        raise ValueError("tokens must be bytes in [0, 256)")
    table = torch.full((256,), TOKEN_CLASSES.index("other"), dtype=torch.int64)
    for name, chars in (("letter", string.ascii_letters), ("digit", string.digits),
                        ("whitespace", string.whitespace), ("punctuation", string.punctuation)):
        table[list(chars.encode())] = TOKEN_CLASSES.index(name)
    tokens = tokens.long().cpu()
    classes = table[tokens]
    for match in _WORD.finditer(bytes(tokens.to(torch.uint8).tolist())):
        if match.group() in _KEYWORDS:
            classes[match.start():match.end()] = TOKEN_CLASSES.index("keyword")
    return classes


def class_expert_counts(classes: torch.Tensor, experts: torch.Tensor, n_classes: int, num_experts: int
                        ) -> torch.Tensor:
    """Token-slots of each class routed to each expert. classes: ``[N]``, experts: ``[N, k]`` -> ``[C, E]`` int64
    (sums to ``N * k``)."""
    check_int("n_classes", n_classes, 1)
    check_experts(experts, num_experts)
    check_tensor("classes", classes, "[N] (class ids)", 1, kind="int")
    if classes.shape[0] != experts.shape[0]:
        raise ValueError(f"classes must have one entry per token of experts [N={experts.shape[0]}, k], got shape "
                         f"{tuple(classes.shape)}")
    if reads_values(classes) and classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= n_classes):
        raise ValueError(f"classes must hold class ids in 0..{n_classes - 1} (n_classes={n_classes}), got ids from "
                         f"{int(classes.min())} to {int(classes.max())}")
    pair = classes.long()[:, None] * num_experts + experts.long()
    return torch.bincount(pair.reshape(-1), minlength=n_classes * num_experts).view(n_classes, num_experts)


def class_expert_stats(classes: torch.Tensor, experts: torch.Tensor, n_classes: int, num_experts: int
                       ) -> tuple[torch.Tensor, float]:
    """``(P(expert | class) [C, E] float32, I(class; expert) in nats)`` over token-slots.

    Rows of classes with no token are zero. The mutual information ``sum_ce p(c,e) log(p(c,e) / (p(c) p(e)))``
    is 0 when every class is routed alike (no specialisation) and at most ``min(H(class), log E)``."""
    counts = class_expert_counts(classes, experts, n_classes, num_experts).double()
    rows = counts.sum(1, keepdim=True)
    given = torch.where(rows > 0, counts / rows.clamp_min(1), 0.0)
    joint = counts / counts.sum().clamp_min(1)
    indep = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    mi = torch.where(joint > 0, joint * torch.log(joint / indep.clamp_min(1e-300)), 0.0).sum()
    return given.float(), float(mi)


def routing_decisions(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Experts each MoE layer of ``model`` (a :class:`moe_lab.MoETransformer`) picks for ``idx: [B, S]`` in eval
    mode -> ``[L, B*S, k]`` int64."""
    check_type("model", model, torch.nn.Module, "a moe_lab.MoETransformer")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, infos = model(idx)
    finally:
        model.train(was_training)
    if not infos:
        raise ValueError("model has no MoE layer")
    return torch.stack([info.experts.cpu() for info in infos])


def router_saturation(experts: torch.Tensor, final: torch.Tensor) -> float:
    """OLMoE's router saturation: the mean over tokens of ``|top-k(t) & top-k(final)| / k``, the share of the
    experts chosen at a checkpoint that the final checkpoint also chooses (order within the top-k ignored).
    experts, final: ``[N, k]`` expert ids of the same tokens. 1 = routing no longer changes."""
    check_tensor("experts", experts, "[N, k] (expert ids)", 2, kind="int")
    check_tensor("final", final, "[N, k] (expert ids)", 2, kind="int")
    if experts.shape != final.shape or experts.shape[0] == 0:
        raise ValueError(f"experts and final must both be [N, k] with N >= 1, got shapes {tuple(experts.shape)} "
                         f"and {tuple(final.shape)}")
    same = (experts.long()[:, :, None] == final.long()[:, None, :]).any(-1)  # [N, k]
    return float(same.float().mean())


class RoutingSnapshots(TrainHook):
    """Records :func:`routing_decisions` of a fixed probe batch ``idx: [B, S]`` after every ``every``-th optimiser
    step (and after the last): ``steps`` (1-based step counts) and ``experts`` (each ``[L, B*S, k]``)."""

    def __init__(self, idx: torch.Tensor, every: int):
        check_tensor("idx", idx, "[batch, seq_len] (token ids)", 2, kind="int")
        if not idx.numel():
            raise ValueError(f"idx must hold at least one token, got shape {tuple(idx.shape)}")
        check_int("every", every, 1)
        self.idx, self.every = idx, every
        self.steps: list[int] = []
        self.experts: list[torch.Tensor] = []

    def after_optimizer_step(self, state: TrainState) -> None:
        done = state.step + 1
        if done % self.every == 0 or done == state.steps:
            device = next(state.model.parameters()).device
            self.steps.append(done)
            self.experts.append(routing_decisions(state.model, self.idx.to(device)))

    def saturation(self) -> torch.Tensor:
        """``[len(steps), L]`` router saturation of each snapshot against the last one, per MoE layer."""
        if not self.experts:
            raise ValueError("saturation() needs at least one snapshot: none was recorded yet (pass this hook to "
                             "moe_lab.train.train(hooks=[...]) first)")
        final = self.experts[-1]
        return torch.tensor([[router_saturation(snap[layer], final[layer]) for layer in range(final.shape[0])]
                             for snap in self.experts])
