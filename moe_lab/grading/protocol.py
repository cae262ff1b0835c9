"""The call protocol, grader side: write the cases for a kernel, ask it to run them (an audit event served by
:mod:`moe_lab.grading.launcher`), and read its reply without trusting it.

Reading a reply is bounded before anything is materialised: the file must be a regular file (opened without
following links and without blocking, so a FIFO cannot hang the grader) of at most ``MAX_REPLY_BYTES``; its
signature must verify; the records must be an uncompressed ``torch.save`` archive whose pickle is small, loaded
with ``weights_only=True`` (data, never code); and the loaded structure is walked with a budget on values,
nesting and tensor elements that counts a shared reference every time it appears.
"""
from __future__ import annotations

import hmac
import io
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..checks.calls import MAX_DEPTH, MAX_ELEMENTS, MAX_ITEMS
from ..checks.core import GradedCase, case_input
from .launcher import CALL_EVENT, sign

MAX_REPLY_BYTES = 128 * 2**20
MAX_HEADER_BYTES = 2**16
MAX_PICKLE_BYTES = 4 * 2**20


class BadReply(ValueError):
    """The reply is missing, unreadable or too large (``signed``: it came from the launcher, the records did not
    pass), or not signed by the kernel's launcher."""

    def __init__(self, message: str, signed: bool = False):
        super().__init__(message)
        self.signed = signed


def save_cases(cases: list[GradedCase], path: Path) -> None:
    torch.save([case_input(item) for item in cases], path)


def request(function: str, cases_path: Path, out_path: Path, nonce: str, allow: tuple[str, ...]) -> str:
    """The code the kernel runs for one graded call."""
    args = ", ".join(repr(a) for a in (function, str(cases_path), str(out_path), nonce, tuple(allow)))
    return f'__import__("sys").audit({CALL_EVENT!r}, globals(), {args})\n'


def read_bounded(path: Path, limit: int) -> bytes:
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
        raise BadReply(f"the records are not a torch archive ({type(err).__name__})", signed=True) from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise BadReply("the records archive is compressed (torch.save never compresses)", signed=True)
        if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
            raise BadReply(f"the records' structure is larger than {MAX_PICKLE_BYTES // 2**20} MB", signed=True)
        total += info.file_size
    if total > len(body):
        raise BadReply("the records archive claims more data than it holds", signed=True)


def check_structure(value: Any, cases: int) -> None:
    """Raise ``BadReply`` unless ``value`` is plain data within the bounds of ``cases`` outputs (each value
    counted every time it is reached, so shared references cannot multiply the work)."""
    budget = {"items": 3 * MAX_ITEMS * max(1, cases), "elements": 3 * MAX_ELEMENTS * max(1, cases)}

    def walk(v: Any, depth: int) -> None:
        budget["items"] -= 1
        if budget["items"] < 0 or depth > MAX_DEPTH + 4:
            raise BadReply("the records hold too many values or are nested too deeply", signed=True)
        if isinstance(v, torch.Tensor):
            budget["elements"] -= v.numel()
            if budget["elements"] < 0 or v.layout != torch.strided or v.device.type != "cpu":
                raise BadReply("the records hold tensors that are too large or not plain CPU tensors", signed=True)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k, depth + 1)
                walk(x, depth + 1)
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            raise BadReply(f"the records hold a {type(v).__name__}", signed=True)
        elif isinstance(v, str) and len(v) > 10**6:
            raise BadReply("the records hold a string that is too long", signed=True)

    walk(value, 0)


def read_reply(path: Path, key: bytes, nonce: str, cases: int) -> dict:
    """The verified reply: ``{"nonce", "integrity": {"violation", "tamper"}, "missing"?, "records"?}``."""
    try:
        data = read_bounded(path, MAX_REPLY_BYTES)
    except FileNotFoundError:
        raise BadReply("no reply") from None
    except (OSError, ValueError) as err:
        raise BadReply(f"its reply file is unusable ({err})") from None
    line, _, body = data.partition(b"\n")
    try:
        if len(line) > MAX_HEADER_BYTES:
            raise ValueError
        header = json.loads(line)
        if not (isinstance(header, dict) and isinstance(header.get("mac"), str) and header["mac"].isascii()):
            raise ValueError
    except ValueError:
        raise BadReply("its reply is not signed") from None
    if not hmac.compare_digest(header["mac"], sign(key, header, body)) or header.get("nonce") != nonce:
        raise BadReply("its reply is not signed by the grader's launcher")
    if "missing" not in header:
        _check_archive(body)
        try:
            records = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
        except Exception as err:  # data that is not plain data
            raise BadReply(f"its records could not be loaded as plain data ({type(err).__name__})", signed=True) from None
        check_structure(records, cases)
        header["records"] = records
    return header
