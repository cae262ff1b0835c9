"""Wall-clock time of the named parts of a training step, measured from inside library code.

    timer = StepTimer()
    for _ in range(6):
        with timer.step():                      # one step: its total is "step"
            y, info = layer(x)                  # the library times its own parts ("dispatch all-to-all", ...)
            with timer.region("backward"):      # and you can add yours
                y.sum().backward()
    timer.summary(skip=1)                      # {"step": s, "backward": s, "experts": s, ...}: median per step

Library code marks its parts with :func:`region` and reports the bytes a collective sent with
:func:`record_bytes`; both do nothing unless a :class:`StepTimer` step is open, so they cost nothing otherwise.
Regions may nest (``"backward"`` contains ``"dispatch all-to-all (backward)"``); a region entered several times
in one step (one per layer) adds up. Time spent inside a collective includes waiting for the slowest peer.
On CUDA pass ``device``: every region boundary then synchronises, so a region times its kernels, not their
launch (this changes the overlap the step would otherwise have: use it to attribute time, not to benchmark).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .validation import check_choice, check_int, check_type

_ACTIVE: list["StepTimer"] = []  # the timer whose step is open (a list, not a context variable: autograd may
# run backward functions on another thread)


@dataclass
class StepRecord:
    """One step: ``seconds[name]`` spent in each region, ``bytes_sent[name]`` and ``off_rank_bytes[name]`` the
    bytes this rank's collectives in that region sent (all of them / only those to other ranks)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    off_rank_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class StepTimer:
    """Collects a :class:`StepRecord` per :meth:`step`. ``device``: synchronise it at region boundaries (CUDA)."""

    def __init__(self, device: torch.device | str | None = None):
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must be None, a torch.device or a device name such as 'cuda', got "
                             f"{device!r} ({err})") from None
        self.steps: list[StepRecord] = []
        self._open: StepRecord | None = None

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def step(self) -> Iterator[StepRecord]:
        """Time one step (region ``"step"``) and record the library's regions inside it."""
        if self._open is not None:
            raise RuntimeError("StepTimer.step() is already open: steps do not nest")
        record = StepRecord()
        self._open = record
        _ACTIVE.append(self)
        try:
            with self.region("step"):
                yield record
        finally:
            _ACTIVE.remove(self)
            self._open = None
        self.steps.append(record)

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Add the time spent inside to region ``name`` of the open step (nothing if no step is open)."""
        check_type("name", name, str, "a region name (str)")
        record = self._open
        if record is None:
            yield
            return
        record.seconds[name] += 0.0  # regions are listed in the order they are first entered
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            record.seconds[name] += time.perf_counter() - start

    def record_bytes(self, name: str, sent: int, off_rank: int) -> None:
        """Add ``sent`` bytes (``off_rank`` of them to other ranks) to region ``name`` of the open step."""
        check_type("name", name, str, "a region name (str)")
        check_int("sent", sent, 0)
        check_int("off_rank", off_rank, 0, sent)
        if self._open is not None:
            self._open.bytes_sent[name] += int(sent)
            self._open.off_rank_bytes[name] += int(off_rank)

    @contextmanager
    def time_module(self, module: nn.Module, name: str) -> Iterator[None]:
        """Inside this block, every forward call of ``module`` (e.g. a layer's router) is timed as ``name``."""
        check_type("module", module, nn.Module, "a torch.nn.Module (e.g. layer.router)")
        check_type("name", name, str, "a region name (str)")
        starts: list = []

        def before(*_):
            starts.append(self.region(name))
            starts[-1].__enter__()

        def after(*_):
            starts.pop().__exit__(None, None, None)

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def summary(self, skip: int = 0, stat: str = "median") -> dict[str, float]:
        """Seconds per step of each region over the recorded steps after the first ``skip`` (warm-up):
        ``stat`` ``"median"``, ``"min"``, ``"max"`` or ``"mean"``; a region absent from a step counts 0 there."""
        reducers = {"median": statistics.median, "min": min, "max": max, "mean": statistics.fmean}
        check_choice("stat", stat, tuple(reducers))
        check_int("skip", skip, 0)
        steps = self.steps[skip:]
        if not steps:
            raise ValueError(f"no steps recorded after skipping {skip} (recorded: {len(self.steps)})")
        names = list(dict.fromkeys(name for s in steps for name in s.seconds))
        return {name: reducers[stat]([s.seconds.get(name, 0.0) for s in steps]) for name in names}


def region(name: str):
    """Library code: time the block as region ``name`` of the open :class:`StepTimer` step, if any."""
    return _ACTIVE[-1].region(name) if _ACTIVE else _NO_TIMER


def record_bytes(name: str, sent: int, off_rank: int) -> None:
    """Library code: report that a collective in region ``name`` sent ``sent`` bytes, ``off_rank`` of them to
    other ranks (recorded only while a :class:`StepTimer` step is open)."""
    if _ACTIVE:
        _ACTIVE[-1].record_bytes(name, sent, off_rank)


class _NoTimer:
    """A reusable do-nothing context manager (cheaper than building a generator context each call)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_TIMER = _NoTimer()
