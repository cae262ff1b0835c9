"""The checker: clear verdicts, never raises, hidden cases catch hard-coded answers, feedback that teaches
(tiered hints, known mistakes named, arguments by name, readable scalars), and the integrity rule."""
import functools
import re
import importlib
import sys
import threading
import types

import pytest
import torch

import moe_lab

from moe_lab.checks import REGISTRY, check, hint, integrity, run_check
from moe_lab.checks.core import Case, Exercise, compare, describe
from moe_lab.utils import seed_everything

from .notebook_code import ROOT, notebook_namespace


@pytest.fixture(scope="module")
def solutions():
    """The solution functions of notebook 02 (the correct answers a student would write)."""
    return notebook_namespace(ROOT / "solutions" / "02_softmax_gating_topk.ipynb")


def test_verdict_lines(capsys):
    check("01.1", lambda d, f, a: (3 if a == "swiglu" else 2) * d * f)
    check("01.1", lambda d, f, a: 2 * d * f)
    check("01.1", lambda d, f, a: (_ for _ in ()).throw(NotImplementedError()))
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[PASS\] 01.1 ffn_params: all \d+ cases passed \(1/1 points\)", lines[0])
    assert lines[1] == "[FAIL] 01.1 ffn_params: (0/1 points)"
    assert lines[2] == "    case 'd_model=16, d_ff=64, swiglu' failed: output: expected 3072, got 2048"
    hint_at = next(i for i, line in enumerate(lines) if line.startswith("    Hint:"))
    assert all(line.startswith("    ") for line in lines[2:hint_at + 1])
    assert lines[-1] == "[TODO] 01.1 ffn_params: not implemented yet (0/1 points)"


def test_failure_lines_are_wrapped_at_spaces():
    """JupyterLab wraps a long output line anywhere (word-break: break-all): every line fits, words stay whole."""
    result = run_check("02.2", lambda logits, k, renormalize: (logits.softmax(-1).topk(k)[0], logits.topk(k)[1]))
    text = str(result)
    assert text.splitlines()[0] == "[FAIL] 02.2 topk_gating: (0/2 points)"
    assert all(len(line) <= 96 for line in text.splitlines()), text
    words = lambda t: t.replace("\n", " ").split()  # noqa: E731
    assert [w for w in words(text) if w not in ("[FAIL]", "02.2", "topk_gating:", "(0/2", "points)")] == \
        words(result.message)


@pytest.mark.slow
def test_never_raises_on_broken_answers():
    def crash(*args):
        raise KeyError("boom")

    for answer in (crash, lambda *a: None, lambda *a: "text", None, 42):
        for ex_id in REGISTRY:
            result = run_check(ex_id, answer)
            assert result.status in ("failed", "error") and result.points == 0
    assert "raised KeyError" in run_check("02.3", crash).message
    assert "expected a function" in run_check("02.3", 42).message
    assert run_check("99.9", crash).status == "error"


def test_student_cannot_mutate_the_reference_inputs():
    def vandal(experts, num_experts):
        expected = torch.bincount(experts.flatten(), minlength=num_experts)
        experts.zero_()
        return expected

    assert run_check("02.3", vandal, hidden=True).status == "passed"


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.slow
def test_hard_coded_visible_answers_fail_hidden_cases():
    for ex_id, ex in REGISTRY.items():
        if ex.drive:  # the student writes a class that the checker builds and trains: no answer to memorise
            continue
        seed_everything(0)
        visible = ex.cases(False)
        answers = [(case, ex.reference(*case.args, **case.kwargs)) for case in visible]

        def memorised(*args, **kwargs):
            for case, answer in answers:
                if _same(list(case.args), list(args)):
                    return answer
            raise ValueError("unknown input")

        if not any(case.grad_wrt for case in visible):  # a memorised tensor has no gradient to give
            assert run_check(ex_id, memorised).status == "passed", ex_id
        assert run_check(ex_id, memorised, hidden=True).status == "failed", ex_id


def test_gradient_cases_catch_detached_answers():
    def detached(expert_outputs, gates):
        return torch.einsum("te,etd->td", gates, expert_outputs).detach()

    result = run_check("01.3", detached)
    assert result.status == "failed" and "not differentiable" in result.message


def test_compare_messages():
    assert compare(torch.zeros(2, 3), torch.zeros(3, 2), 0, 0) == "output should have shape (2, 3), got (3, 2)"
    assert "dtype torch.int64" in compare(torch.zeros(2, dtype=torch.long), torch.zeros(2), 0, 0)
    assert "index [1]" in compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), 1e-5, 1e-6)
    assert compare((1, 2), (1, 2), 0, 0) is None
    assert "tuple of 2 items" in compare((1, 2), [1], 0, 0)


def test_scalars_and_booleans_print_readably():
    assert compare(True, False, 0, 0) == "output: expected True, got False"
    assert compare(torch.tensor(0.885), torch.tensor(1.0), 1e-5, 1e-6) == "output: expected 0.885, got 1"
    assert compare(0.885, 1, 1e-5, 1e-6) == "output: expected 0.885, got 1"
    assert compare(True, torch.tensor(False), 0, 0) == "output: expected True, got False"
    assert compare(torch.tensor([True, False]), torch.tensor([True, True]), 0, 0).startswith(
        "output differs at index [1]: expected False, got True (expected [True, False], got [True, True])")
    assert compare(3, True, 0, 0) == "output: expected 3 (int), got True (bool)"


def test_descriptions_are_bounded_and_never_materialise():
    huge = torch.zeros(1).expand(30_000_000)
    assert describe(huge) == "tensor of shape (30000000,), torch.float32, starting 0, 0, 0, 0, 0, 0, ..."
    assert len(describe(list(range(10**6)))) < 130
    result = run_check("02.3", lambda experts, n: list(range(10**6)))
    assert result.status == "failed" and "too large" in result.message and len(str(result)) < 600
    result = run_check("02.3", lambda experts, n: torch.zeros(1).expand(30_000_000))
    assert "too large" in result.message
    shared = [0]
    for _ in range(22):
        shared = [shared, shared]
    assert "too large" in run_check("02.3", lambda experts, n: shared).message


def test_list_outputs_and_torch_not_implemented_errors(solutions):
    assert run_check("02.2", lambda *a: list(solutions["topk_gating"](*a))).status == "passed"
    result = run_check("02.1", lambda x, w: torch.nn.functional.silu(x.long()).float())
    assert result.status == "failed" and "raised NotImplementedError" in result.message


# ------------------------------------------------------------------------------------------ feedback that teaches


def _scaled_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits / temperature).softmax(dim=-1)


def _straight_through(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return (logits / temperature).softmax(-1).detach() + logits - logits.detach()


@pytest.fixture
def toy(monkeypatch):
    """A registered toy exercise with tiered hints and two known mistakes."""
    def cases(hidden):
        return [Case("T=3, E=4", (torch.randn(3, 4), 2.0), grad_wrt=(0,))]

    ex = Exercise("99.1", "scaled_softmax", "A toy", 1, _scaled_softmax, cases, "divide, then normalise",
                  hints=("softmax over the last dimension", "(logits / temperature).softmax(-1)"),
                  mistakes={"multiplying by the temperature instead of dividing":
                            lambda logits, t: (logits * t).softmax(dim=-1),
                            "a straight-through gradient": _straight_through})
    monkeypatch.setitem(REGISTRY, ex.id, ex)
    monkeypatch.setattr("moe_lab.checks.core._REVEALED", {})
    return ex


def test_known_mistakes_are_named(toy):
    result = run_check("99.1", lambda logits, t: (logits * t).softmax(dim=-1))
    assert result.status == "failed"
    assert "\nthis looks like multiplying by the temperature instead of dividing\nHint: divide" in result.message
    # the output is right but its gradient is not: the mistake whose gradient matches is named
    blocked = run_check("99.1", lambda logits, t: (logits / t).softmax(-1).detach() + logits - logits.detach())
    assert "gradient w.r.t. `logits` differs" in blocked.message
    assert "this looks like a straight-through gradient" in blocked.message
    other = run_check("99.1", lambda logits, t: logits.softmax(-1))
    assert other.status == "failed" and "looks like" not in other.message


def test_arguments_are_named_by_parameter(toy):
    result = run_check("99.1", lambda logits, t: (logits / t).softmax(-1) * 2)
    assert "output differs" in result.message
    result = run_check("99.1", lambda logits, t: (logits.detach() / t).softmax(-1).requires_grad_())
    assert "no gradient reaches case input `logits`" in result.message

    def aux_loss_without_gradient(probs, experts):
        counts = torch.bincount(experts.flatten(), minlength=probs.shape[1]).float()
        return probs.shape[1] * (counts / experts.numel() * probs.detach().mean(0)).sum() + 0 * probs.sum()

    result = run_check("04.3", aux_loss_without_gradient)
    assert "gradient w.r.t. `probs` differs" in result.message


def test_hints_are_revealed_one_tier_at_a_time(toy, capsys):
    check("99.1", lambda logits, t: logits)
    assert "Hint: divide, then normalise (more: hint('99.1'))" in capsys.readouterr().out
    hint("99.1")
    hint("99.1")
    hint("99.1")
    hint("99.1", 1)
    assert capsys.readouterr().out.splitlines() == [
        "Hint 2/3 for 99.1 scaled_softmax (next: hint('99.1')): softmax over the last dimension",
        "Hint 3/3 for 99.1 scaled_softmax (the last one): (logits / temperature).softmax(-1)",
        "Hint 3/3 for 99.1 scaled_softmax (the last one): (logits / temperature).softmax(-1)",
        "Hint 1/3 for 99.1 scaled_softmax (next: hint('99.1')): divide, then normalise"]
    with pytest.raises(ValueError, match="tier must be an int from 1 to 3"):
        hint("99.1", 4)
    with pytest.raises(ValueError, match="exercise_id must be one of"):
        hint("99.9")


def test_registration_is_validated():
    args = ("99.2", "f", "t", 1, _scaled_softmax, lambda hidden: [], "idea")
    with pytest.raises(ValueError, match="allow entries"):
        Exercise(*args, allow=("softmax_topk",))
    with pytest.raises(TypeError, match="mistakes"):
        Exercise(*args, mistakes={"x": 3})
    with pytest.raises(TypeError, match="hint"):
        Exercise(*args, hints=("",))


def test_every_allow_entry_names_moe_lab_code():
    names = integrity.package_table().names()
    for ex in REGISTRY.values():
        for entry in ex.allow:
            assert any(n == entry or n.startswith(entry + ".") for n in names), (ex.id, entry)


# ------------------------------------------------------------------------------------------ the integrity rule


def _routes():
    """Ways a student's topk_gating (02.2) can reach moe_lab's implementation."""
    import moe_lab
    from moe_lab.checks import nb02
    from moe_lab.routing import softmax_topk

    imported = types.FunctionType(nb02.topk_gating.__code__, nb02.topk_gating.__globals__)
    imported.__module__ = "__main__"
    relocated = types.FunctionType(nb02.topk_gating.__code__.replace(co_filename="/tmp/mine.py"),
                                   nb02.topk_gating.__globals__)

    def wrapper(logits, k, renormalize):
        return softmax_topk(logits, k, renormalize=renormalize)[1:]

    def method(logits, k, renormalize):
        moe_lab.Router(logits.shape[1], logits.shape[1])
        return wrapper(logits, k, renormalize)

    def games(logits, k, renormalize):
        module = importlib.import_module("moe_lab." + "checks.nb02")
        return getattr(module, "topk" + "_gating")(logits, k, renormalize)

    def in_thread(logits, k, renormalize):
        out = []
        thread = threading.Thread(target=lambda: out.append(nb02.topk_gating(logits, k, renormalize)))
        thread.start()
        thread.join()
        return out[0]

    def checks_itself(logits, k, renormalize):
        run_check("02.1", lambda x, w: x)
        return logits

    return {"imported under its name": (nb02.topk_gating, "moe_lab.checks.nb02.topk_gating"),
            "__module__ changed": (imported, "moe_lab.checks.nb02.topk_gating"),
            "functools.partial": (functools.partial(nb02.topk_gating), "moe_lab.checks.nb02.topk_gating"),
            "wrapper": (wrapper, "moe_lab.routing.softmax_topk"),
            "method of a moe_lab object": (method, "moe_lab.routing.Router.__init__"),
            "getattr and importlib": (games, "moe_lab.checks.nb02.topk_gating"),
            "rebuilt from __code__": (relocated, "moe_lab.checks.nb02.topk_gating"),
            "a thread it starts": (in_thread, "moe_lab.checks.nb02.topk_gating"),
            "the checker itself": (checks_itself, "moe_lab.checks.core.run_check")}


@pytest.mark.parametrize("route", list(_routes()))
def test_calls_into_moe_lab_score_zero_by_any_route(route, capsys):
    fn, called = _routes()[route]
    result = run_check("02.2", fn, hidden=True)
    assert result.status == "failed" and result.points == 0
    assert result.message.startswith(f"topk_gating called {called} while being graded; a graded function may not "
                                     "call into moe_lab"), result.message
    assert "(this one allows none)" in result.message
    check("02.2", fn)
    assert f"called {called}" in capsys.readouterr().out
    assert sys.getprofile() is None and threading._start_new_thread is integrity._start_new_thread


def test_allowed_calls_pass(solutions, monkeypatch):
    from moe_lab.routing import softmax_topk

    def uses_the_library(logits, k, renormalize):
        return softmax_topk(logits, k, renormalize=renormalize)[1:]

    monkeypatch.setattr(REGISTRY["02.2"], "allow", ("moe_lab.routing.softmax_topk",))
    assert run_check("02.2", uses_the_library, hidden=True).status == "passed"
    monkeypatch.setattr(REGISTRY["02.2"], "allow", ("moe_lab.routing",))  # a module: softmax_topk and its helpers
    assert run_check("02.2", uses_the_library, hidden=True).status == "passed"
    monkeypatch.setattr(REGISTRY["02.2"], "allow", ("moe_lab.checks.nb02.topk_gating",))  # calls nested inside it
    result = run_check("02.2", uses_the_library)
    assert "called moe_lab.routing.softmax_topk" in result.message and "allows moe_lab.checks.nb02" in result.message


def test_backward_of_allowed_library_code_is_allowed():
    """Autograd runs a library Function's backward after the allowed forward returned: allowed; calling a
    library backward whose forward never ran (here: directly) is not."""
    from moe_lab.permute import _GatherSlots

    layer = moe_lab.MoELayer(8, 16, 4, 2)

    def trains(x):
        y, _ = layer(x)
        y.sum().backward()
        return y

    def direct(x):
        _GatherSlots.backward(types.SimpleNamespace(saved_tensors=(torch.arange(2),), num_tokens=2, k=1), x)
        return x

    for fn, allowed in ((trains, True), (direct, False)):
        guard = integrity.Guard(allow=("moe_lab.layer.MoELayer.forward",))
        with guard:
            fn(torch.randn(2, 8))
        assert (guard.violation is None) == allowed, guard.violation
    assert guard.violation == "called moe_lab.permute._GatherSlots.backward"


def test_the_solutions_pass_under_the_guard(solutions):
    for ex_id, fn in (("02.2", "topk_gating"), ("02.5", "moe_forward")):
        assert run_check(ex_id, solutions[fn], hidden=True).status == "passed"


@pytest.mark.parametrize("how", ["sys.setprofile", "sys.settrace", "map(sys.setprofile)"])
def test_switching_the_guard_off_is_detected(how):
    from moe_lab.checks.nb02 import topk_gating

    def tamper(logits, k, renormalize):
        if how == "sys.setprofile":
            sys.setprofile(None)
        elif how == "sys.settrace":
            sys.settrace(lambda *a: None)
        else:
            list(map(sys.setprofile, [None]))
        return topk_gating(logits, k, renormalize)

    result = run_check("02.2", tamper)
    assert result.status == "failed" and "the integrity check was interfered with" in result.message
    assert sys.getprofile() is None and sys.gettrace() is None


def test_starting_a_process_scores_zero():
    import subprocess

    def spawns(logits, k, renormalize):
        subprocess.run(["true"], check=False)
        return logits

    assert "started a process (subprocess.Popen)" in run_check("02.2", spawns).message


# ------------------------------------------------------------------------------------------ honest code, odd errors


def test_student_code_that_compiles_like_the_library_is_not_library_code():
    """A natural 11.5 (the reference's own name and generator expression: the same bytecode and qualified name)
    passes; an exact copy of the reference's code object under another file name is still moe_lab's."""
    from moe_lab.checks import nb11

    def trainable_count(sizes, groups, recipe):
        chosen = {"moe", "non_moe", "router"} if "all" in recipe else set(recipe)
        trainable = {name for g in chosen for name in groups[g]}
        return sum(size for name, size in sizes.items() if name in trainable)

    assert run_check("11.5", trainable_count, hidden=True).status == "passed"
    code = nb11.trainable_count.__code__
    copy = types.FunctionType(code.replace(co_filename="/tmp/notebook.py"), nb11.trainable_count.__globals__)
    assert "called moe_lab.checks.nb11.trainable_count" in run_check("11.5", copy).message


def test_exceptions_that_break_their_own_description_never_break_the_check():
    class Meta(type):
        @property
        def __name__(cls):
            raise RuntimeError("no name")

    class Weird(Exception, metaclass=Meta):
        def __str__(self):
            raise RuntimeError("no text")

    class Base(BaseException):
        pass

    def weird(*args):
        raise Weird()

    def base(*args):
        raise Base("not an Exception")

    assert "raised Weird" in run_check("02.3", weird).message
    assert "raised Base: not an Exception" in run_check("02.3", base).message


def test_an_exception_names_the_line_of_the_students_own_code():
    import linecache

    source = "def helper(x):\n    return x @ x\n\ndef tokens_per_expert(experts, num_experts):\n    return helper(experts.float())\n"
    linecache.cache["/tmp/student_cell.py"] = (len(source), None, source.splitlines(True), "/tmp/student_cell.py")
    namespace = {"torch": torch}
    exec(compile(source, "/tmp/student_cell.py", "exec"), namespace)
    result = run_check("02.3", namespace["tokens_per_expert"])
    assert "raised RuntimeError" in result.message
    assert "(at student_cell.py, line 2: return x @ x)" in result.message, result.message


def test_copies_must_be_new_tensors():
    def views(w1, w3, w2, num_experts):
        return tuple(w[None].expand(num_experts, *w.shape) for w in (w1, w3, w2))

    def stacked(w1, w3, w2, num_experts):
        return tuple(torch.stack([w] * num_experts) for w in (w1, w3, w2))

    def same(w1, w3, w2, num_experts):  # E = 1 only: the input itself, as a view
        return tuple(w.unsqueeze(0).repeat(num_experts, 1, 1) if num_experts > 1 else w.unsqueeze(0)
                     for w in (w1, w3, w2))

    assert run_check("11.1", stacked, hidden=True).status == "passed"
    message = run_check("11.1", views).message
    assert "output[0] has the right values but shares memory of its own elements" in message, message
    assert "shares memory with the input `w1`" in run_check("11.1", same).message


def test_the_checker_and_the_grader_use_the_notebooks_visible_cases():
    for ex in REGISTRY.values():
        if ex.id in ("04.5", "13.5"):
            continue  # slow references; the rule is in exercise_cases, the same for every exercise
        visible = [c.name for c, hidden in __import__("moe_lab.checks.core", fromlist=["_"]).exercise_cases(ex, 99, True)
                   if not hidden]
        seed_everything(0)
        assert visible == [c.name for c in ex.cases(False)], ex.id


def test_a_signal_handler_cannot_run_the_reference_unseen():
    """A handler can fire inside the profile hook, where calls are not seen: handlers are off during the call, and
    one installed meanwhile is tampering."""
    import signal

    from moe_lab.checks.nb02 import topk_gating

    fired = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: fired.append(topk_gating(torch.randn(3, 4), 2, True)))
    try:
        def raises_signal(logits, k, renormalize):
            signal.raise_signal(signal.SIGUSR1)
            return topk_gating.__wrapped__ if False else (logits.softmax(-1).topk(k)[0], logits.topk(k)[1])

        run_check("02.2", raises_signal)
        assert fired == []  # ignored during the call
        assert callable(signal.getsignal(signal.SIGUSR1))  # and back afterwards

        def installs(logits, k, renormalize):
            signal.signal(signal.SIGUSR2, lambda *a: None)
            return logits

        assert "installed a signal handler" in run_check("02.2", installs).message
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def test_an_audit_hook_of_the_notebooks_is_tampering():
    """CPython runs audit hooks unprofiled: a notebook that adds one makes every later check report interference
    (in a fresh interpreter: an audit hook cannot be removed)."""
    import subprocess

    code = ("import sys\nfrom moe_lab.checks import run_check\nfrom moe_lab.checks.nb02 import topk_gating\n"
            "sys.addaudithook(lambda event, args: None)\n"
            "print(run_check('02.2', lambda l, k, r: topk_gating(l, k, r)).message)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "added an audit hook" in out.stdout, out.stdout + out.stderr


def test_the_experiment_exercise_allows_its_parts_not_its_training_step(monkeypatch):
    """04.5 may use the experiment's set-up, batches and evaluation and the layer, not the library's own step."""
    from moe_lab.balancing import BalanceConfig, BalanceExperiment, train_router

    seed_everything(0)
    monkeypatch.setattr(REGISTRY["04.5"], "cases", lambda hidden: [Case("alpha=0.1, seed=0, steps=3", (0.1, 0, 3))])

    def whole_step(alpha, seed, steps=100):
        return train_router(BalanceConfig(alpha=alpha, seed=seed), steps)["max_over_mean"]

    def library_step(alpha, seed, steps=100):
        experiment = BalanceExperiment(BalanceConfig(alpha=alpha, seed=seed))
        experiment.step(steps)
        return experiment.evaluate()["max_over_mean"]

    assert "called moe_lab.balancing.train_router" in run_check("04.5", whole_step).message
    assert "called moe_lab.balancing.BalanceExperiment.step" in run_check("04.5", library_step).message
