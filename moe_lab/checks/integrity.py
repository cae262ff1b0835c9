"""The integrity rule: while a graded function runs, it may call into ``moe_lab`` only where its exercise allows
(``Exercise.allow``), by whatever route the call takes.

A :class:`Guard` is active around every call of a student's function (in ``check`` and in the grader's kernel).
While it is, a profile hook (``sys.setprofile``, and in every thread started meanwhile) sees each Python call.
When the code called is ``moe_lab``'s, the hook walks back through the calling frames: the call is fine if the code
or one of its callers (up to the checker's own frames) is allowed, and otherwise it is a violation naming the
entry point. Code is ``moe_lab``'s by where it was loaded from: a file of the package (a :class:`CodeTable` compiles
the package's source files; code in them that matches none of their code objects, e.g. edited since, is moe_lab code
that no ``allow`` entry matches), or an exact copy of one of the package's code objects (the same bytecode,
constants, names, qualified name, first line and line table, e.g. a function rebuilt from a moe_lab function's
``__code__`` with another file name). Student code that merely compiles to the same bytecode (a generator
expression, a lambda, a one-liner written like the library's) is not moe_lab's: it was written elsewhere.

Tampering is detected rather than prevented: an audit hook (``sys.addaudithook``, which cannot be removed) notices
``sys.setprofile`` / ``sys.settrace`` calls, process creation and audit hooks added by the notebook (CPython runs
them unprofiled), and a canary call at the end of each guarded region must reach the hook. Python signal handlers
are switched off while a guard is active in the main thread (a handler can run inside the profile hook, where calls
are not seen), and a handler installed meanwhile is tampering. What is not defended is listed in README.md
("Threat model"); the grader runs each submission in a sandbox whose ``moe_lab`` holds no answers
(:mod:`moe_lab.grading.build`), so this guard is defence in depth there and ``check``'s teacher in the notebook.

This module imports only the standard library: the grader's kernel loads it from its file before any student
code runs, without importing ``moe_lab``.
"""
from __future__ import annotations

import _posixsubprocess
import _thread
import os
import signal
import sys
import threading
import types

TRUSTED = "trusted"            # kind of the checker's own code: a boundary of the walk, never a violation
PROCESS_EVENTS = frozenset({"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                            "subprocess.Popen", "pty.spawn"})
_CACHE_LIMIT = 200_000

_setprofile, _getprofile = sys.setprofile, sys.getprofile
_settrace, _gettrace = sys.settrace, sys.gettrace
_get_ident = _thread.get_ident
_start_new_thread = _thread.start_new_thread
_fork_exec = _posixsubprocess.fork_exec
_current_frames = sys._current_frames
_MAIN_THREAD = threading.main_thread().ident  # captured when loaded: the notebook cannot move it later
_signal, _getsignal = signal.signal, signal.getsignal
_SIGNALS = tuple(s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))
_KEEP_HANDLERS = [signal.default_int_handler]  # handlers that stay on during a call (see keep_signal_handler)


def _fingerprint(code: types.CodeType) -> tuple:
    """Everything that makes a code object this one: a copy matches, code written elsewhere does not (its first
    line and line table differ even when its bytecode and names are the same)."""
    return (code.co_code, code.co_consts, code.co_names, code.co_varnames, code.co_qualname, code.co_firstlineno,
            code.co_linetable)


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def module_name(path: str, package_dir: str) -> str:
    """``moe_lab.checks.core`` for ``<package_dir>/checks/core.py``."""
    rel = os.path.relpath(path, os.path.dirname(package_dir))[: -len(".py")]
    parts = rel.split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class CodeTable:
    """Every code object of the package's source files (as found on disk now), by fingerprint."""

    def __init__(self, package_dir: str):
        self.package_dir = os.path.realpath(package_dir)
        self._prefix = self.package_dir + os.sep
        self._names: dict[tuple, set[str]] = {}
        self._modules: dict[str, str | None] = {}  # file name -> module, None outside the package
        self._seen: dict[int, tuple] = {}           # id(code) -> (code, identify(code)): each code looked at once
        self._module_names: set[str] = set()
        for folder, dirs, files in os.walk(self.package_dir):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for file in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, file)
                try:
                    with open(path, "rb") as f:
                        code = compile(f.read(), path, "exec", dont_inherit=True)
                except (OSError, SyntaxError, ValueError):
                    continue
                module = module_name(path, self.package_dir)
                self._module_names.add(module)
                for c in _code_objects(code):
                    self._names.setdefault(_fingerprint(c), set()).add(f"{module}.{c.co_qualname}")

    def names(self) -> set[str]:
        """The qualified name of every code object in the table."""
        return set().union(*self._names.values())

    def modules(self) -> set[str]:
        """The name of every module in the table."""
        return set(self._module_names)

    def lookup(self, code: types.CodeType) -> tuple[str, bool] | None:
        """:meth:`identify`, remembered (the code object is kept, so its id is not reused)."""
        entry = self._seen.get(id(code))
        if entry is not None and entry[0] is code:
            return entry[1]
        if len(self._seen) > _CACHE_LIMIT:
            self._seen.clear()
        kind = self.identify(code)
        self._seen[id(code)] = (code, kind)
        return kind

    def identify(self, code: types.CodeType) -> tuple[str, bool] | None:
        """``(qualified name, genuine)`` if ``code`` is moe_lab's, else ``None``: code loaded from a file of the
        package (``genuine`` if it is one of that file's code objects as built; code changed since, or moved there
        from another function, is not genuine and no ``allow`` entry matches it), or an exact copy of one of the
        package's code objects (relocated: genuine). Other code is not moe_lab's, whatever its bytecode."""
        module = self._modules.get(code.co_filename, False)
        if module is False:
            path = "" if code.co_filename.startswith("<") else os.path.realpath(code.co_filename)
            module = module_name(path, self.package_dir) if path.startswith(self._prefix) else None
            self._modules[code.co_filename] = module
        names = self._names.get(_fingerprint(code))
        if module:
            here = f"{module}.{code.co_qualname}"
            return here, bool(names) and here in names
        if names:  # moe_lab's code object itself, under another file name
            return min(names), True
        return None


_TABLE: CodeTable | None = None


def package_table() -> CodeTable:
    """The table of the ``moe_lab`` package this module belongs to (built once per process)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = CodeTable(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return _TABLE


_INSTALLED = tuple(os.path.join(os.path.realpath(p), "") for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
_installed: dict[str, bool] = {}


def _is_installed(filename: str) -> bool:
    """Code of the Python installation (the standard library, torch and the other installed packages)."""
    found = _installed.get(filename)
    if found is None:
        found = _installed[filename] = filename.startswith("<frozen") or os.path.realpath(filename).startswith(
            _INSTALLED)
    return found


def library_callers_only(name: str) -> None:
    """In the grader's answer-free build (:mod:`moe_lab.grading.build`), the first statement of a function that
    answers an exercise but that allowed library code needs: it runs only when its nearest caller outside the
    Python installation is genuine moe_lab code, and raises otherwise."""
    frame = sys._getframe(2)
    while frame is not None and _is_installed(frame.f_code.co_filename):
        frame = frame.f_back
    kind = package_table().lookup(frame.f_code) if frame is not None else None
    if not (kind and kind[1]):
        raise RuntimeError(f"{name} is not available while grading, except to moe_lab's own code (the grader "
                           "computes the answers outside this kernel)")


def trusted_codes(*namespaces: dict) -> set[types.CodeType]:
    """The code objects of the functions and classes in ``namespaces`` (module dicts): the checker's own code."""
    found: set[types.CodeType] = set()

    def add(obj, depth=0):
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                add(f, depth)
        elif isinstance(obj, types.FunctionType):
            found.update(_code_objects(obj.__code__))
        elif isinstance(obj, type) and depth == 0:
            for value in vars(obj).values():
                add(value, 1)

    for namespace in namespaces:
        for value in list(namespace.values()):
            if getattr(value, "__module__", None) == namespace.get("__name__"):
                add(value)
    return found


class _State:
    """Process-wide: the active guard, the trusted code, and threads whose profiler a student replaced."""

    def __init__(self):
        self.guard: Guard | None = None
        self.depth = 0
        self.trusted: set[int] = set()
        self.pinned: list = []
        self.own: set[int] = set()          # threads setting the profiler themselves right now
        self.all_threads = False           # every thread started gets the profiler (the grader's kernel)
        self.tampered: set[int] = set()    # threads that replaced it since
        self.audit = False
        self.hooks_added: str | None = None  # an audit hook the notebook added (it runs unprofiled)


_STATE = _State()


def _canary() -> None:
    """Called at the end of every guarded region: the profile hook must see it."""


_CANARY = _canary.__code__


def trust(codes) -> None:
    """Add code objects to the checker's own code (the walk stops at their frames; they are never checked)."""
    for code in codes:
        _STATE.pinned.append(code)
        _STATE.trusted.add(id(code))


def _own(fn, *args):
    ident = _get_ident()
    _STATE.own.add(ident)
    try:
        return fn(*args)
    finally:
        _STATE.own.discard(ident)


def _profile(frame, event, arg):
    if event == "call":
        guard = _STATE.guard
        if guard is not None:
            try:
                guard._on_call(frame)
            except Exception:  # e.g. at the recursion limit: unless the code is known not to be moe_lab's, say so
                entry = guard.table._seen.get(id(frame.f_code))
                if id(frame.f_code) not in _STATE.trusted and (
                        entry is None or entry[0] is not frame.f_code or entry[1] is not None):
                    guard._violate("called code the integrity check could not inspect (at the recursion limit "
                                   "or out of memory)")


def _in_thread(function, args, kwargs):
    _own(_setprofile, _profile)
    return function(*args, **kwargs)


def _thread_start(function, args, kwargs=None):
    """``_thread.start_new_thread`` whose thread runs with the profile hook."""
    if _STATE.all_threads or _STATE.guard is not None:
        return _start_new_thread(_in_thread, (function, args, {} if kwargs is None else kwargs))
    return _start_new_thread(function, args, *(() if kwargs is None else (kwargs,)))


def _process_start(*args, **kwargs):
    """``_posixsubprocess.fork_exec`` (multiprocessing's spawn uses it without an audit event)."""
    if _STATE.guard is not None:
        _STATE.guard._violate("started a process (_posixsubprocess.fork_exec)")
    return _fork_exec(*args, **kwargs)


def _patch_threads(on: bool) -> None:
    if not isinstance(_start_new_thread, types.BuiltinFunctionType):
        return  # another guard (the grader's kernel launcher) already hooks every thread: leave its hook in place
    start = _thread_start if on else _start_new_thread
    _thread.start_new_thread = _thread.start_new = threading._start_new_thread = start
    _posixsubprocess.fork_exec = _process_start if on else _fork_exec


def _audit(event: str, args: tuple) -> None:
    if event == "sys.setprofile" or event == "sys.settrace":
        ident = _get_ident()
        if ident in _STATE.own:
            return
        if _STATE.guard is not None:
            _STATE.guard._tamper(f"called {event}")
        elif _STATE.all_threads and ident != _MAIN_THREAD:
            _STATE.tampered.add(ident)
    elif event == "sys.addaudithook":
        if sys._getframe(1).f_code == _install.__code__:
            return  # another copy of this module installing its hook (the notebook imported moe_lab.checks)
        _STATE.hooks_added = _STATE.hooks_added or "added an audit hook (sys.addaudithook), which runs unprofiled"
        if _STATE.guard is not None:
            _STATE.guard._tamper(_STATE.hooks_added)
    elif event in PROCESS_EVENTS and _STATE.guard is not None:
        _STATE.guard._violate(f"started a process ({event})")


def _install() -> None:
    if not _STATE.audit:
        _STATE.audit = True
        trust(trusted_codes(globals()))
        sys.addaudithook(_audit)


def hook_all_threads() -> None:
    """From now on every thread started gets the profile hook (dormant while no guard is active), so that a
    thread started before a graded call is checked during it; a thread that replaces the hook is remembered.
    The grader's kernel calls this before any student code runs."""
    _install()
    _STATE.all_threads = True
    _patch_threads(True)


def _owner(name: str) -> str:
    """The class or enclosing function of a qualified name (``a.B.backward`` -> ``a.B``; ``a.f.<locals>.g`` -> ``a.f``)."""
    owner = name.rsplit(".", 1)[0]
    return owner[: -len(".<locals>")] if owner.endswith(".<locals>") else owner


def is_allowed(name: str, allow: tuple[str, ...]) -> bool:
    """Whether the qualified name ``name`` is an entry of ``allow`` or lies under one (module or class prefix)."""
    return any(name == entry or name.startswith(entry + ".") for entry in allow)


class Guard:
    """Enforces ``allow`` (qualified names or prefixes of moe_lab code) inside ``with guard:`` blocks, which must
    be written in trusted code (see :func:`trust`). After the blocks: ``violation`` (what was called or done)
    and ``tamper`` (how the check was interfered with), ``None`` if nothing happened."""

    def __init__(self, allow: tuple[str, ...] = (), table: CodeTable | None = None):
        _install()
        self.allow = tuple(allow)
        self._exact, self._prefixes = set(self.allow), tuple(entry + "." for entry in self.allow)
        self.table = table or package_table()
        self.violation: str | None = None
        self.tamper: str | None = None
        self._canary_seen = False
        self._saved: list[tuple] = []
        self._signals: list[dict | None] = []
        self._owners_ran: set[str] = set()

    def _kind(self, code):
        return TRUSTED if id(code) in _STATE.trusted else self.table.lookup(code)

    def _allowed(self, kind) -> bool:
        name, genuine = kind
        return genuine and (name in self._exact or name.startswith(self._prefixes))

    def _on_call(self, frame) -> None:
        code = frame.f_code
        if code is _CANARY:
            self._canary_seen = True
            return
        kind = self._kind(code)
        if kind is None or kind is TRUSTED or self.violation is not None:
            return
        if self._allowed(kind) or self._deferred(kind):
            self._ran(kind)
            return
        caller = frame.f_back
        while caller is not None:
            outer = self._kind(caller.f_code)
            if outer is TRUSTED:
                break
            if outer is not None and (self._allowed(outer) or self._deferred(outer)):
                self._ran(kind)
                return
            caller = caller.f_back
        name, genuine = kind
        self._violate(f"called {name}" + ("" if genuine else " (moe_lab code changed since it was loaded)"))

    def _ran(self, kind) -> None:
        """Remember that allowed moe_lab code ran (and its class or enclosing function), for :meth:`_deferred`."""
        name = kind[0]
        self._owners_ran.update((name, _owner(name)))

    def _deferred(self, kind) -> bool:
        """A ``backward`` or a closure (a gradient hook) of moe_lab code that already ran, allowed, in this guard:
        autograd calls it later, outside the allowed caller, on the graph that allowed code built."""
        name, genuine = kind
        return genuine and (name.endswith(".backward") or ".<locals>." in name) and _owner(name) in self._owners_ran

    def _violate(self, what: str) -> None:
        if self.violation is None:
            self.violation = what

    def _tamper(self, what: str) -> None:
        if self.tamper is None:
            self.tamper = what

    def __enter__(self) -> "Guard":
        if _STATE.tampered & set(_current_frames()):
            self._tamper("a thread started by the notebook replaced the integrity check's profiler")
        if _STATE.hooks_added:
            self._tamper(_STATE.hooks_added)
        self._saved.append((_STATE.guard, _getprofile(), _gettrace()))
        self._signals.append(_quiet_signals())
        if _STATE.depth == 0 and not _STATE.all_threads:
            _patch_threads(True)
        _STATE.depth += 1
        _STATE.guard = self
        _own(_settrace, None)
        _own(_setprofile, _profile)
        return self

    def __exit__(self, *exc) -> None:
        self._canary_seen = False
        _canary()
        if not self._canary_seen or _getprofile() is not _profile:
            self._tamper("the integrity check's profiler was switched off")
        guard, profile, trace = self._saved.pop()
        _own(_setprofile, profile)
        _own(_settrace, trace)
        _STATE.guard = guard
        _STATE.depth -= 1
        if _STATE.depth == 0 and not _STATE.all_threads:
            _patch_threads(False)
        if _restore_signals(self._signals.pop()):
            self._tamper("installed a signal handler while being checked (a handler can run where the integrity "
                         "check does not look)")


def keep_signal_handler(handler) -> None:
    """Let ``handler`` stay installed during guarded calls (the grader's kernel: its interrupt handler)."""
    _KEEP_HANDLERS.append(handler)


def _foreign(handler) -> bool:
    return callable(handler) and not any(handler == keep for keep in _KEEP_HANDLERS)  # ==: bound methods


def _quiet_signals() -> dict | None:
    """In the main thread: ignore every signal that has a Python handler of the notebook's (Python's and the
    grader's interrupt handlers stay, so a call that runs too long can be interrupted), remembering the handlers;
    ``None`` elsewhere (only the main thread runs handlers)."""
    if _get_ident() != _MAIN_THREAD:
        return None
    saved = {}
    for number in _SIGNALS:
        try:
            handler = _getsignal(number)
        except (OSError, ValueError):
            continue
        if _foreign(handler):
            saved[number] = handler
            _signal(number, signal.SIG_IGN)
    return saved


def _restore_signals(saved: dict | None) -> bool:
    """Put back the handlers :func:`_quiet_signals` switched off; ``True`` if a Python handler was installed
    meanwhile (it is removed)."""
    if saved is None:
        return False
    changed = False
    for number in _SIGNALS:
        try:
            handler = _getsignal(number)
        except (OSError, ValueError):
            continue
        if _foreign(handler) and number not in saved:
            changed = True
            _signal(number, signal.SIG_IGN)
        elif number in saved:
            changed |= handler is not signal.SIG_IGN
            _signal(number, saved[number])
    return changed


_install()  # from the import on (the whole module defined): an audit hook the notebook adds later is seen
