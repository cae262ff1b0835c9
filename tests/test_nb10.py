"""Notebook 10: the statements its prose generates from measured data agree with the data it stores."""
import re
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / "notebooks" / "10_stability.ipynb"


def _outputs(nb) -> list[str]:
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text") or out.get("data", {}).get("text/markdown") or "")
    return texts


def _scaling_table(texts: list[str]) -> list[dict]:
    """The stored table 'scaling the router weights' (weights x -> prob. error, flipped tokens %)."""
    text = next(t for t in texts if "scaling the router weights" in t)
    lines = text.split("scaling the router weights\n", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, map(float, line.split()))) for line in lines[1:]]


def test_the_probability_error_statement_is_what_the_table_shows():
    texts = _outputs(nbformat.read(NB, as_version=4))
    rows = _scaling_table(texts)
    assert [r["weights x"] for r in rows] == [1, 3, 10, 30, 100]
    statement = next(t for t in texts if t.startswith("How to read it:"))
    errors = [r["prob. error"] for r in rows]
    peak = max(range(len(rows)), key=errors.__getitem__)
    assert 0 < peak < len(rows) - 1, "the stored table no longer peaks inside the range: the prose must change"
    expected = (f"rises from {errors[0]:.4f} at ×1 to a peak of {errors[peak]:.4f} at ×{rows[peak]['weights x']:g} "
                f"and then falls, to {errors[-1]:.4f} at ×100")
    assert expected in " ".join(statement.split())
    flips = [r["flipped tokens %"] for r in rows]
    assert f"between {min(flips):.2f}% and {max(flips):.2f}%" in statement


def test_no_hand_typed_statement_about_the_probability_error_remains():
    nb = nbformat.read(NB, as_version=4)
    prose = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "absolute error of the probabilities" not in prose
    assert "ST-MoE (Sec. 2.4)" not in prose and "NaNGuard" in prose


# ------------------------------------------------------------------ exercise 10.2: gradients by hand, no autograd

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_lab.checks import REGISTRY, run_check  # noqa: E402


def _by_autograd_grad(x, weight):
    x, weight = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss = torch.logsumexp(x @ weight.T, dim=-1).square().mean()
    grad_weight, grad_x = torch.autograd.grad(loss, (weight, x))
    return loss.detach(), grad_weight, grad_x


def _by_backward(x, weight):
    x, weight = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = torch.logsumexp(F.linear(x, weight), dim=-1).pow(2).mean()
    loss.backward()
    return loss.detach(), weight.grad, x.grad


def _by_torch_func(x, weight):
    def z_loss(w, inputs):
        return torch.logsumexp(inputs @ w.T, dim=-1).square().mean()
    grad_weight, grad_x = torch.func.grad(z_loss, argnums=(0, 1))(weight, x)
    return z_loss(weight, x), grad_weight, grad_x


def _by_jacobian(x, weight):
    def z_loss(w, inputs):
        return torch.logsumexp(inputs @ w.T, dim=-1).square().mean()
    grad_weight, grad_x = torch.autograd.functional.jacobian(z_loss, (weight, x))
    return z_loss(weight, x), grad_weight, grad_x


def _hooks_disabled(x, weight):
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks"):
        return _by_autograd_grad(x, weight)


def _hand_logsumexp(x, weight):
    z = x @ weight.T
    lse = torch.logsumexp(z, dim=-1)
    g = 2 * lse.unsqueeze(-1) * torch.softmax(z, dim=-1) / z.shape[0]
    return (lse**2).mean(), torch.einsum("te,td->ed", g, x), torch.einsum("te,ed->td", g, weight)


def _hand_log_softmax(x, weight):
    z = F.linear(x, weight)
    lse = (z - F.log_softmax(z, dim=-1))[:, 0]
    p = F.log_softmax(z, dim=-1).exp()
    g = (2.0 / len(z)) * lse[:, None] * p
    return torch.mean(lse * lse), g.t().mm(x), g.mm(weight)


def _hand_float64(x, weight):
    x64, w64 = x.double(), weight.double()
    z = x64 @ w64.T
    m = z.amax(dim=1, keepdim=True)
    lse = (m + (z - m).exp().sum(dim=1, keepdim=True).log()).squeeze(1)
    g = 2 * lse[:, None] * (z - lse[:, None]).exp() / z.shape[0]
    return lse.square().mean().float(), (g.T @ x64).float(), (g @ w64).float()


@pytest.mark.parametrize("answer", [_by_autograd_grad, _by_backward, _by_torch_func, _by_jacobian, _hooks_disabled])
def test_an_autograd_answer_to_10_2_scores_zero(answer):
    assert REGISTRY["10.2"].no_autograd
    result = run_check("10.2", answer, hidden=True)
    assert result.status == "failed" and result.points == 0, str(result)


@pytest.mark.parametrize("answer", [_by_autograd_grad, _by_backward, _by_jacobian])
def test_the_verdict_names_autograd(answer):
    assert "autograd" in run_check("10.2", answer).message


@pytest.mark.parametrize("answer", [_hand_logsumexp, _hand_log_softmax, _hand_float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_natural_answers_by_hand_to_10_2_pass(answer, seed):
    result = run_check("10.2", answer, hidden=True, seed=seed)
    assert result.status == "passed" and result.points == 3, str(result)


def test_autograd_stays_allowed_where_the_exercise_does_not_forbid_it():
    assert not REGISTRY["10.3"].no_autograd  # 10.3's checker differentiates the student's output itself


# ------------------------------------------------------------------------- section 4: remedies and their controls


def _remedies_table(texts: list[str]) -> dict[str, dict]:
    text = next(t for t in texts if "peak = highest training loss" in t)
    lines = text.split("\n", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    columns = re.split(r"\s{2,}", lines[0].strip())
    table = {}
    for line in lines[2:]:
        name, rest = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        table[name] = dict(zip(columns, rest.split()))
    return table


def test_the_section_4_conclusions_are_what_the_table_shows():
    texts = _outputs(nbformat.read(NB, as_version=4))
    table = _remedies_table(texts)
    assert {"baseline (unstable)", "control: dense FFNs", "control: lr 0.3 with warm-up"} <= set(table)
    statement = " ".join(next(t for t in texts if t.startswith("What fixed the unstable run")).split())
    for name, row in table.items():
        if name != "baseline (unstable)":
            assert f"spiked in {row['spiked']} seeds, validation loss {row['val loss']}" in statement, name
    dense, warm = table["control: dense FFNs"]["spiked"], table["control: lr 0.3 with warm-up"]["spiked"]
    n = dense.split("/")[1]
    assert ("the instability is not the router's" in statement) == (dense == f"{n}/{n}")
    assert ("warm-up removes the spike in every seed" in statement) == warm.startswith("0/")
    base = table["baseline (unstable)"]
    assert f"at most {float(base['max bf16 flips %']):.1f}% of a step's tokens" in statement
