"""Slow, obvious references the property tests compare the library against: per-token Python loops in float64."""
import math

import torch


def ref_gating(logits, k, score_func="softmax", renormalize=True, softmax_order="before_topk", bias=None,
               groups=None, scale=1.0):
    """Per-token float64 reference: scores (softmax or sigmoid); selection by the score plus the bias (by the
    logit without a bias: the same order, exact where scores underflow or saturate); optionally group-limited
    (``groups = (n_groups, topk_groups, group_score)``, groups scored on the selection scores); gates from the
    unbiased scores, renormalised as asked, times ``scale``."""
    scores, gates, experts = [], [], []
    for row in logits.double().tolist():
        if score_func == "softmax":
            m = max(row)
            s = [math.exp(v - m) / sum(math.exp(u - m) for u in row) for v in row]
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
        sel = list(row) if bias is None else [a + b for a, b in zip(s, bias.tolist())]
        candidates = list(range(len(row)))
        if groups is not None and groups[0] > 1:
            n_groups, topk_groups, how = groups
            size = len(row) // n_groups
            sel_scores = s if bias is None else sel  # without a bias: on the scores (the library: in log space)
            def group_score(g):
                members = sorted((sel_scores[i] for i in range(g * size, (g + 1) * size)), reverse=True)
                return members[0] if how == "max" else members[0] + members[1]
            kept = sorted(range(n_groups), key=lambda g: -group_score(g))[:topk_groups]
            candidates = [i for g in sorted(kept) for i in range(g * size, (g + 1) * size)]
        idx = sorted(candidates, key=lambda i: -sel[i])[:k]
        if score_func == "softmax" and softmax_order == "after_topk":
            m = max(row[i] for i in idx)
            g = [math.exp(row[i] - m) / sum(math.exp(row[j] - m) for j in idx) for i in idx]
        else:
            g = [s[i] for i in idx]
            if renormalize and (score_func == "softmax" or k > 1):
                g = [v / sum(g) for v in g]
        scores.append(s), gates.append([v * scale for v in g]), experts.append(idx)
    num_experts = logits.shape[1]
    return (torch.tensor(scores, dtype=torch.float64).reshape(-1, num_experts),
            torch.tensor(gates, dtype=torch.float64).reshape(-1, k), torch.tensor(experts).reshape(-1, k))


def ref_queue_positions(experts, probs, policy):
    """Walk the slots in priority order, each taking the next place in its expert's queue."""
    num_tokens, k = experts.shape
    if policy == "position":
        slots = [(t, j) for j in range(k) for t in range(num_tokens)]
    elif policy == "probability":  # highest probability first; ties keep the position order (a stable sort)
        slots = sorted([(t, j) for j in range(k) for t in range(num_tokens)], key=lambda s: -float(probs[s]))
    else:  # batch priority: tokens by their top-1 probability, every first choice before any second choice
        tokens = sorted(range(num_tokens), key=lambda t: -float(probs[t].max()))
        slots = [(t, j) for j in range(k) for t in tokens]
    seen: dict[int, int] = {}
    pos = torch.zeros(num_tokens, k, dtype=torch.int64)
    for t, j in slots:
        e = int(experts[t, j])
        pos[t, j] = seen.get(e, 0)
        seen[e] = pos[t, j].item() + 1
    return pos
