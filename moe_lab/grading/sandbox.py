"""Where a submission's kernel runs: a bubblewrap (``bwrap``) sandbox of its own, or, only when the instructor asks
for it (``--unsafe-no-sandbox``), a plain process.

The sandbox (Linux namespaces, unprivileged) gives the kernel and everything it starts:

- its own PID namespace: it sees only its own processes, and all of them die with it (and with the grader);
- no network (its own network namespace with nothing in it), its own IPC and hostname;
- a root file system of its own, read-only: the system's ``/usr`` (and ``/bin``, ``/lib``... as on the host), a few
  files of ``/etc``, the Python installation's folders (prefix and ``sys.path``), and the course at ``/course``: the
  answer-free ``moe_lab`` (:mod:`moe_lab.grading.build`), which also covers any other copy of ``moe_lab`` that
  falls under a mounted folder; the course repository (``solutions/``), the submissions and the grader's own files
  are hidden wherever they would otherwise show;
- a private, size-limited ``/tmp`` (its working directory is ``/tmp/work``) and ``/dev/shm``;
- no capabilities, no new user namespaces (``--disable-userns``), a new session (no terminal to inject into).

Memory, processes, open files and file sizes are limited by the kernel's launcher (``RLIMIT_*``; the process count
is per user namespace, so it counts exactly the sandbox's processes) and the memory of all its processes and of its
``/tmp`` by the grader's watchdog (:mod:`moe_lab.grading.kernel`). The grader talks to the kernel only over pipes it
created.
"""
from __future__ import annotations

import functools
import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

COURSE = "/course"          # where the answer-free build is mounted inside the sandbox
WORK = "/tmp/work"          # the kernel's working directory inside the sandbox
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives",
       "/etc/ssl/certs", "/etc/fonts", "/etc/mime.types")
FLAGS = ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
         "--cap-drop", "ALL", "--hostname", "moe-lab-grader", "--uid", "65534", "--gid", "65534")
UNSAFE = ("without a sandbox the notebook's code runs as you: it can read and change your files (other submissions, "
          "the grader's folders, the course and its solutions), use the network, start processes that outlive the "
          "grader, and, through them, change another submission's row")


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def python_folders() -> list[str]:
    """The folders the Python installation needs (prefixes, ``sys.path``, site folders), real paths, outermost
    first, none inside another."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             *site.getsitepackages(), site.getusersitepackages(), *sys.path}
    folders = sorted({os.path.realpath(p) for p in found if p and os.path.isdir(p)}, key=len)
    kept: list[str] = []
    for folder in folders:
        if folder != "/" and not any(_under(folder, k) for k in kept + list(SYSTEM)):
            kept.append(folder)
    return kept


@dataclass
class Sandbox:
    """How kernels are confined. ``kind``: ``"bwrap"`` or ``"none"`` (``--unsafe-no-sandbox``); ``hide``: paths the
    kernel must not see (the course repository, the submissions, the grader's output folders); ``tmp_mb``: the size
    of its ``/tmp`` and of its ``/dev/shm``; ``user``: without a sandbox, the uid (and gid) a grader running as root
    runs kernels as (Gradescope's container)."""

    kind: str = "bwrap"
    hide: tuple[str, ...] = ()
    tmp_mb: int = 1024
    user: int | None = None

    def command(self, argv: list[str], build: Path, threads: int, info_fd: int) -> list[str]:
        """The command line that runs ``argv`` (``argv[0]`` is Python, then the launcher inside ``build``) in the
        sandbox, writing bubblewrap's JSON (the kernel's host PID) to ``info_fd``."""
        args = ["bwrap", *FLAGS]
        mounted: list[str] = []
        for folder in SYSTEM:
            if os.path.islink(folder):
                args += ["--symlink", os.readlink(folder), folder]
            elif os.path.isdir(folder):
                args += ["--ro-bind", folder, folder]
                mounted.append(folder)
        args += [x for f in ETC if os.path.exists(f) for x in ("--ro-bind", f, f)]
        hidden = {os.path.realpath(p) for p in self.hide}
        for folder in python_folders():
            if folder not in hidden:  # the course repository on the path (PYTHONPATH): the build replaces it
                args += ["--ro-bind", folder, folder]
                mounted.append(folder)
        package = build / "moe_lab"
        for entry in {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}:
            real = os.path.join(entry, "moe_lab")
            if os.path.isdir(real) and any(_under(real, m) for m in mounted):  # another copy of moe_lab: the build
                args += ["--ro-bind", str(package), real]
        for path in sorted(hidden):
            if any(_under(path, m) for m in mounted):
                args += ["--tmpfs", path] if os.path.isdir(path) else ["--ro-bind", "/dev/null", path]
        size = str(self.tmp_mb * 2**20)
        args += ["--ro-bind", str(build), COURSE, "--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", size, "--tmpfs", "/tmp", "--dir", WORK, "--size", size, "--tmpfs",
                 "/dev/shm", "--remount-ro", "/", "--chdir", WORK, "--info-fd", str(info_fd), "--clearenv"]
        for key, value in environment(COURSE, threads, home="/tmp").items():
            args += ["--setenv", key, value]
        launcher = os.path.join(COURSE, "moe_lab", "grading", "launcher.py")
        return args + ["--", argv[0], launcher, *argv[2:]]


def environment(course: str, threads: int, home: str) -> dict[str, str]:
    """The kernel's environment: the course first on the path, CPU only, ``threads`` OpenMP threads."""
    python_bin = os.path.dirname(os.path.realpath(sys.executable))
    env = {"PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "USER": "student",
           "LOGNAME": "student", "LANG": "C.UTF-8", "PYTHONPATH": course, "PYTHONDONTWRITEBYTECODE": "1",
           "MPLBACKEND": "Agg", "MPLCONFIGDIR": os.path.join(home, ".matplotlib"),
           "IPYTHONDIR": os.path.join(home, ".ipython"), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUSERBASE": site.getuserbase()}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


@functools.lru_cache(maxsize=None)
def bwrap_problem() -> str | None:
    """Why bubblewrap sandboxes cannot run here (``None`` if they can): not Linux, no ``bwrap``, or no user
    namespaces (e.g. inside a container that forbids them)."""
    if not sys.platform.startswith("linux"):
        return f"sandboxes need Linux (this is {sys.platform})"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    args = ["bwrap", *FLAGS]
    for folder in SYSTEM:
        if os.path.islink(folder):
            args += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            args += ["--ro-bind", folder, folder]
    try:
        out = subprocess.run([*args, "--proc", "/proc", "--dev", "/dev", "--", "true"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap does not run ({err})"
    if out.returncode != 0:
        return f"bwrap cannot create a sandbox here ({out.stderr.strip()[:300] or out.returncode})"
    return None
