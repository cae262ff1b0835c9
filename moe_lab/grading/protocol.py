"""The call protocol, grader side: frames over the two pipes the grader created for a kernel (see
:mod:`moe_lab.grading.launcher`), written and read with a deadline and without trusting what comes back.

Reading is bounded before anything is materialised: a frame's header is at most ``MAX_HEADER_BYTES`` and its payload
``MAX_REPLY_BYTES``; a reply's records must be an uncompressed ``torch.save`` archive whose pickle is small, loaded
with ``weights_only=True`` (data, never code); and the loaded structure is walked with a budget on values, nesting
and tensor elements that counts a shared reference every time it appears. The grader never opens a path the kernel
can write.
"""
from __future__ import annotations

import io
import json
import os
import select
import stat
import time
import zipfile
from typing import Any

import torch

from ..checks.calls import MAX_DEPTH, MAX_ELEMENTS, MAX_ITEMS
from ..checks.core import GradedCase, case_input
from .launcher import FRAME, encode

MAX_REPLY_BYTES = 128 * 2**20
MAX_HEADER_BYTES = 2**16
MAX_PICKLE_BYTES = 4 * 2**20


class BadReply(ValueError):
    """The records a kernel sent back are not plain data within the bounds."""


class ChannelClosed(OSError):
    """The kernel's end of the pipes is gone (it died) or sent something that is not a frame."""


def cases_payload(cases: list[GradedCase]) -> bytes:
    """What a kernel's call takes: the cases' inputs and cotangents, ``torch.save``'d."""
    buffer = io.BytesIO()
    torch.save([case_input(item) for item in cases], buffer)
    return buffer.getvalue()


def write_frame(fd: int, header: dict, payload: bytes, deadline: float) -> None:
    """Send a frame; ``TimeoutError`` if the kernel does not read it by ``deadline``, ``ChannelClosed`` if its end
    is gone."""
    data = memoryview(encode(header, payload))
    while data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the kernel did not read the request")
        _, ready, _ = select.select([], [fd], [], min(left, 0.5))
        if ready:
            try:
                data = data[os.write(fd, data[:1 << 16]):]
            except (BrokenPipeError, OSError) as err:
                raise ChannelClosed(f"the kernel's end of the pipe is closed ({err})") from None


class Reader:
    """Reads frames from a non-blocking pipe, across several deadlines (a reply can arrive in pieces)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, bytearray()
        os.set_blocking(fd, False)

    def _fill(self, deadline: float, need: int) -> bool:
        while len(self.buffer) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, min(need - len(self.buffer), 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise ChannelClosed("the kernel closed its end of the pipe (it died)")
            self.buffer += chunk
        return True

    def read(self, deadline: float) -> tuple[dict, bytes] | None:
        """The next whole frame, or ``None`` if ``deadline`` passes first."""
        if not self._fill(deadline, FRAME.size):
            return None
        head, size = FRAME.unpack(bytes(self.buffer[:FRAME.size]))
        if head > MAX_HEADER_BYTES or size > MAX_REPLY_BYTES:
            raise ChannelClosed(f"the kernel sent a frame of {head + size} bytes (the limit is "
                                f"{MAX_REPLY_BYTES // 2**20} MB): not the grader's protocol")
        if not self._fill(deadline, FRAME.size + head + size):
            return None
        data = bytes(self.buffer[:FRAME.size + head + size])
        del self.buffer[:FRAME.size + head + size]
        try:
            header = json.loads(data[FRAME.size:FRAME.size + head])
            if not isinstance(header, dict):
                raise ValueError
        except (ValueError, RecursionError):
            raise ChannelClosed("the kernel sent a frame that is not the grader's protocol") from None
        return header, data[FRAME.size + head:]


def read_bounded(path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``OSError``/``ValueError`` otherwise (a FIFO, a
    device, a link or a folder is refused without blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > limit:
            raise ValueError(f"larger than {limit // 2**20} MB")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 2**20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise ValueError(f"larger than {limit // 2**20} MB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_archive(body: bytes) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise BadReply(f"the records are not a torch archive ({type(err).__name__})") from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise BadReply("the records archive is compressed (torch.save never compresses)")
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise BadReply(f"the records' structure is larger than {MAX_PICKLE_BYTES // 2**20} MB")
        total += info.file_size
    if total > len(body):
        raise BadReply("the records archive claims more data than it holds")


def check_structure(value: Any, cases: int) -> None:
    """Raise ``BadReply`` unless ``value`` is plain data within the bounds of ``cases`` outputs (each value
    counted every time it is reached, so shared references cannot multiply the work)."""
    budget = {"items": 3 * MAX_ITEMS * max(1, cases), "elements": 3 * MAX_ELEMENTS * max(1, cases)}

    def walk(v: Any, depth: int) -> None:
        budget["items"] -= 1
        if budget["items"] < 0 or depth > MAX_DEPTH + 4:
            raise BadReply("the records hold too many values or are nested too deeply")
        if isinstance(v, torch.Tensor):
            budget["elements"] -= v.numel()
            if budget["elements"] < 0 or v.layout != torch.strided or v.device.type != "cpu":
                raise BadReply("the records hold tensors that are too large or not plain CPU tensors")
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k, depth + 1)
                walk(x, depth + 1)
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            raise BadReply(f"the records hold a {type(v).__name__}")
        elif isinstance(v, str) and len(v) > 10**6:
            raise BadReply("the records hold a string that is too long")

    walk(value, 0)


def read_reply(header: dict, body: bytes, cases: int) -> dict:
    """The checked reply to a call: ``{"integrity": {"violation", "tamper"}, "missing"?, "records"?}``."""
    reply = {"integrity": header.get("integrity") if isinstance(header.get("integrity"), dict) else {}}
    if "missing" in header:
        reply["missing"] = str(header["missing"])[:100]
        return reply
    _check_archive(body)
    try:
        records = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except Exception as err:  # data that is not plain data
        raise BadReply(f"its records could not be loaded as plain data ({type(err).__name__})") from None
    check_structure(records, cases)
    reply["records"] = records
    return reply
