"""Exercises of 04_load_balancing: Shazeer's importance and smooth-load losses, the Switch aux loss and its
gradient, the collapse experiment, and the router z-loss."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ..balancing import BalanceConfig, BalanceExperiment, one_thread, train_router
from ..losses import importance_loss, prob_in_topk, router_z_loss, switch_aux_loss
from ..metrics import tokens_per_expert
from ..routing import dense_gates, softmax_topk
from .core import Case, exercise


def _routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return softmax_topk(torch.randn(t, e) * 2, k)


def importance_loss_from_gates(gates: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Reference for 04.1: ``CV(sum_t G(x_t))^2`` from the top-k ``gates`` and ``experts``."""
    return importance_loss(dense_gates(gates, experts, num_experts))


def _importance_variant(*, unbiased=False, squared=True, counts=False):
    def loss(gates, experts, num_experts):
        dense = dense_gates(gates, experts, num_experts)
        values = (dense != 0).float().sum(0) + 0 * dense.sum(0) if counts else dense.sum(0)
        if values.numel() < 2:
            return values.sum() * 0
        cv2 = values.var(unbiased=unbiased) / (values.mean().square() + 1e-10)
        return cv2 if squared else cv2.sqrt()
    return loss


@exercise("04.1", function="importance_loss_from_gates", title="Shazeer importance loss CV(Importance)^2", points=2,
          reference=importance_loss_from_gates,
          hint="an expert's importance is the total gate weight it receives over the batch; the loss is the "
               "squared coefficient of variation of the importances across experts (0 when they are all equal)",
          hints=("G(x)_i is the token's gate for expert i if it selected i, else 0: spread the [T, k] gates into a "
                 "[T, E] matrix at the chosen experts (scatter), then sum over tokens",
                 "CV^2 = variance / mean^2 with the population variance (the mean of squared deviations, divided by "
                 "E, not E - 1); add eps = 1e-10 to the denominator so all-zero importances give 0; one expert "
                 "gives 0"),
          mistakes={"the unbiased (sample) variance, dividing by E - 1 (Shazeer's CV uses the population variance)":
                    _importance_variant(unbiased=True),
                    "CV instead of CV^2 (the standard deviation over the mean, not squared)":
                    _importance_variant(squared=False),
                    "counting tokens per expert instead of summing their gates (that is the load, and it has no "
                    "gradient)": _importance_variant(counts=True)})
def _importance_cases(hidden: bool) -> list[Case]:
    configs = [(10, 4, 2), (6, 3, 1)] + ([(64, 16, 4), (2, 8, 1), (30, 5, 5)] if hidden else [])
    cases = []
    for t, e, k in configs:
        _, gates, experts = _routing(t, e, k)
        cases.append(Case(f"T={t}, E={e}, k={k}", (gates, experts, e), grad_wrt=(0,)))
    cases.append(Case("equal importance (loss 0)", (torch.full((8, 1), 0.5), torch.arange(8).remainder(4)[:, None], 4)))
    if hidden:
        cases += [Case("one expert", (torch.ones(5, 1), torch.zeros(5, 1, dtype=torch.long), 1)),
                  Case("all gates zero", (torch.zeros(4, 2), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]]), 3))]
    return cases


def _smooth_variant(*, exclude=True, always_next=False, numerator="clean", scaled=True):
    def load(clean, noisy, noise_std, k):
        if k == clean.shape[-1]:
            return torch.ones_like(clean.float())
        top = noisy.float().topk(k + 1, dim=-1).values
        kth, next_best = top[:, k - 1 : k], top[:, k : k + 1]
        if not exclude:
            threshold = kth
        elif always_next:
            threshold = next_best
        else:
            threshold = torch.where(noisy.float() > next_best, next_best, kth)
        centre = (clean if numerator == "clean" else noisy).float()
        z = (centre - threshold) / (noise_std.float() if scaled else 1)
        return torch.distributions.Normal(0.0, 1.0).cdf(z)
    return load


@exercise("04.2", function="smooth_load", title="Shazeer's smooth load P(x, i) with kth_excluding", points=4,
          reference=prob_in_topk, rtol=1e-5, atol=1e-6,
          hint="P(x, i) is the chance that expert i stays in the top k if only its own noise were drawn again: its "
               "noisy logit is then Gaussian around its clean logit, and it must beat the k-th best of the other "
               "experts' noisy logits",
          hints=("kth_excluding(H, k, i) depends on whether i is itself in the top k of H: if it is, the k-th best "
                 "of the others is the (k+1)-th largest of H; if it is not, it is the k-th largest",
                 "one top-(k+1) of H per token gives both thresholds; an expert is in the top k when its noisy logit "
                 "beats the (k+1)-th largest; then P = Phi((clean - threshold) / noise_std), Phi the standard "
                 "normal CDF (torch.distributions.Normal(0, 1).cdf or 0.5 * (1 + erf(z / sqrt 2)))",
                 "with k = E no expert can be pushed out: every P is 1; keep everything differentiable in clean, "
                 "noisy (through the thresholds) and noise_std"),
          mistakes={"thresholding every expert at the k-th largest of all noisy logits, itself included (exclude "
                    "i: an expert in the top k competes with the (k+1)-th)": _smooth_variant(exclude=False),
                    "the (k+1)-th largest as everyone's threshold (for an expert outside the top k the k-th best of "
                    "the others is the k-th largest)": _smooth_variant(always_next=True),
                    "the noisy logit in the numerator (the re-drawn logit is centred at the clean one)":
                    _smooth_variant(numerator="noisy"),
                    "not dividing by the noise scale": _smooth_variant(scaled=False)})
def _smooth_cases(hidden: bool) -> list[Case]:
    configs = [(8, 4, 1), (6, 5, 2)] + ([(64, 16, 4), (5, 3, 2), (10, 8, 7), (random.randint(1, 30), 6, 3)]
                                         if hidden else [])
    cases = []
    for t, e, k in configs:
        clean, noise_std = torch.randn(t, e), F.softplus(torch.randn(t, e))
        noisy = clean + torch.randn(t, e) * noise_std
        cases.append(Case(f"T={t}, E={e}, k={k}", (clean, noisy, noise_std, k), grad_wrt=(0, 1, 2)))
    if hidden:
        clean = torch.randn(4, 3)
        cases.append(Case("k = E (every expert always selected)", (clean, clean + torch.randn(4, 3), torch.ones(4, 3), 3)))
    return cases


def _aux_variant(*, per_token=False, scale=True):
    def loss(probs, experts):
        num_experts = probs.shape[-1]
        f = tokens_per_expert(experts, num_experts).float() / (experts.shape[0] if per_token else experts.numel())
        return (num_experts if scale else 1) * (f * probs.float().mean(dim=0)).sum()
    return loss


def _aux_over_routed(probs, experts):
    num_experts = probs.shape[-1]
    counts = tokens_per_expert(experts, num_experts).float()
    routed = torch.zeros_like(probs, dtype=torch.float32).scatter(1, experts, 1.0)
    p = (probs.float() * routed).sum(0) / counts.clamp_min(1)
    return num_experts * (counts / experts.numel() * p).sum()


@exercise("04.3", function="switch_aux_loss", title="Switch aux loss N * sum_i f_i P_i", points=2,
          reference=switch_aux_loss,
          hint="the loss multiplies, per expert, the share of the traffic it actually got (a count, no gradient) by "
               "the mean probability the router gave it (differentiable), sums over experts and scales by N so "
               "that uniform routing gives exactly 1",
          hints=("f_i = (token-slots sent to i) / (T * k): with top-k every token sends k slots, so the shares sum "
                 "to 1; P_i = the mean over all T tokens of probs[:, i], the full softmax",
                 "count the slots with bincount(minlength=N); return N * sum(f * P) without alpha"),
          mistakes={"f_i over T instead of T * k (Hugging Face's convention: k times this course's loss)":
                    _aux_variant(per_token=True),
                    "forgetting the factor N (uniform routing must give 1)": _aux_variant(scale=False),
                    "P_i averaged only over the tokens routed to i (average over all tokens)": _aux_over_routed})
def _aux_cases(hidden: bool) -> list[Case]:
    configs = [(10, 4, 1), (12, 4, 2)] + ([(100, 8, 2), (3, 16, 1), (50, 6, random.randint(1, 6))] if hidden else [])
    cases = []
    for t, e, k in configs:
        probs, _, experts = _routing(t, e, k)
        cases.append(Case(f"T={t}, E={e}, k={k}", (probs, experts), grad_wrt=(0,)))
    uniform = torch.full((8, 4), 0.25)
    cases.append(Case("perfectly uniform routing (loss 1)", (uniform, torch.arange(8).remainder(4).unsqueeze(1))))
    return cases


def switch_aux_loss_grad(logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Reference for 04.4: autograd's ``dL/dlogits`` (float32) of ``L = N sum_i f_i P_i`` with
    ``P = mean_t softmax(logits_t)`` and ``f`` from ``experts`` (no gradient)."""
    logits = logits.detach().float().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(switch_aux_loss(logits.softmax(dim=-1), experts), logits)[0]


def _aux_grad_variant(*, jacobian="full", per_token=False):
    def grad(logits, experts):
        t, n = logits.shape
        p = logits.float().softmax(dim=-1)
        f = tokens_per_expert(experts, n).float() / (t if per_token else experts.numel())
        a = (n * f / t).expand(t, n)  # dL/dp_{t,i}
        if jacobian == "none":
            return a.clone()
        if jacobian == "diagonal":
            return p * (1 - p) * a
        return p * (a - (p * a).sum(dim=-1, keepdim=True))
    return grad


@exercise("04.4", function="switch_aux_loss_grad", title="The Switch aux-loss gradient by hand", points=4,
          reference=switch_aux_loss_grad, rtol=1e-4, atol=1e-7,
          hint="f is a constant (counts), so the loss is linear in the mean probabilities P; push its gradient "
               "through the mean over tokens and then through each token's softmax",
          hints=("dL/dp_{t,i} = N f_i / T for every token t: the same vector a for all tokens",
                 "a softmax's vector-Jacobian product: for p = softmax(z) and upstream a, dL/dz_j = p_j * (a_j - "
                 "sum_i p_i a_i); every logit gets a gradient, even of experts the token did not choose",
                 "what the gradient does: experts with f_i above the probability-weighted average sum_i p_i a_i get "
                 "their logits pushed down, the others up; compute in float32 and return [T, E]"),
          mistakes={"the gradient w.r.t. the probabilities (N f_i / T), without the softmax's Jacobian":
                    _aux_grad_variant(jacobian="none"),
                    "only the diagonal of the softmax Jacobian, p_i (1 - p_i) (the - p_j p_i cross terms are missing)":
                    _aux_grad_variant(jacobian="diagonal"),
                    "f_i over T instead of T * k": _aux_grad_variant(per_token=True)})
def _aux_grad_cases(hidden: bool) -> list[Case]:
    configs = [(10, 4, 1), (12, 4, 2)] + ([(64, 8, 2), (3, 16, 1), (5, 1, 1), (40, 6, random.randint(1, 6))]
                                           if hidden else [])
    cases = []
    for t, e, k in configs:
        logits = torch.randn(t, e) * 2
        cases.append(Case(f"T={t}, E={e}, k={k}", (logits, logits.topk(k, dim=-1).indices)))
    logits = (torch.randn(6, 4) * 2).bfloat16()
    cases.append(Case("bfloat16 logits (gradient in float32)", (logits, logits.float().topk(2, dim=-1).indices)))
    return cases


def balancing_experiment(alpha: float, seed: int, steps: int = 100) -> float:
    """Reference for 04.5: held-out max/mean tokens per expert after ``steps`` training steps of the collapse
    experiment with Switch aux-loss coefficient ``alpha``."""
    return train_router(BalanceConfig(alpha=alpha, seed=seed), steps)["max_over_mean"]


def _experiment_variant(*, zero_grad=True, aux=True):
    def run(alpha, seed, steps=100):
        experiment = BalanceExperiment(BalanceConfig(seed=seed))
        layer, optimizer = experiment.layer, experiment.optimizer
        layer.train()
        with one_thread():
            for _ in range(steps):
                x, y = experiment.batch()
                out, info = layer(x)
                loss = (out - y).square().mean() + (alpha * info.aux_loss if aux else 0)
                if zero_grad:
                    optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return experiment.evaluate()["max_over_mean"]
    return run


@exercise("04.5", function="balancing_experiment", title="Run the collapse experiment", points=2,
          reference=balancing_experiment,
          allow=("moe_lab.balancing.BalanceExperiment.__init__", "moe_lab.balancing.BalanceExperiment.batch",
                 "moe_lab.balancing.BalanceExperiment.evaluate", "moe_lab.balancing.one_thread",
                 "moe_lab.layer.MoELayer.forward", "moe_lab.layer.RoutingInfo"),
          hint="one training step: the task loss plus alpha times the layer's aux loss, then the usual backward "
               "pass and optimizer update; the router's gradient from the aux loss is what pushes back",
          hints=("the layer returns (output, info) and info.aux_loss is the Switch loss N * sum f_i P_i; the task "
                 "loss is the mean squared error between the output and y",
                 "an optimizer step uses the gradients accumulated since the last zero_grad: clear them every step, "
                 "before backward"),
          mistakes={"forgetting optimizer.zero_grad() (gradients pile up across steps)":
                    _experiment_variant(zero_grad=False),
                    "leaving the aux loss out of the training loss (alpha has no effect)": _experiment_variant(aux=False)})
def _experiment_cases(hidden: bool) -> list[Case]:
    cases = [Case(f"alpha={alpha}, seed={seed}", (alpha, seed)) for alpha, seed in [(0.0, 0), (0.1, 0)]]
    if hidden:  # random coefficients (log-uniform, and 0), seeds and lengths
        for alpha in (0.0, 10 ** random.uniform(-3, 0), 10 ** random.uniform(-2, 0)):
            seed, steps = random.randrange(10**6), random.randint(20, 80)
            cases.append(Case(f"alpha={alpha:.3g}, seed={seed}, steps={steps}", (alpha, seed, steps)))
    return cases


@exercise("04.6", function="router_z_loss", title="ST-MoE router z-loss", points=1, reference=router_z_loss,
          hint="the z-loss penalises large router logits through each token's log-partition function, squared and "
               "averaged over tokens, in float32",
          hints=("per token: logsumexp over experts of its logits; square it; mean over tokens",
                 "log(sum(exp(z))) overflows for logits in the hundreds: torch.logsumexp subtracts the max first",
                 "return torch.logsumexp(logits.float(), dim=-1).square().mean()"),
          mistakes={"logsumexp written as log(sum(exp(z))), which overflows for large logits":
                    lambda logits: torch.log(torch.exp(logits.float()).sum(-1)).square().mean(),
                    "the mean of logsumexp, not of its square":
                    lambda logits: torch.logsumexp(logits.float(), dim=-1).mean(),
                    "computing in the logits' dtype (bfloat16; compute in float32)":
                    lambda logits: torch.logsumexp(logits, dim=-1).square().mean()})
def _z_cases(hidden: bool) -> list[Case]:
    shapes = [(5, 4), (1, 8)] + ([(64, 32), (3, 1)] if hidden else [])
    cases = [Case(f"T={t}, E={e}", (torch.randn(t, e) * 3,), grad_wrt=(0,)) for t, e in shapes]
    cases.append(Case("bfloat16 logits (compute in float32)", ((torch.randn(4, 6) * 4).bfloat16(),)))
    cases.append(Case("large logits (no overflow)", (torch.randn(3, 5) * 100,)))
    return cases
