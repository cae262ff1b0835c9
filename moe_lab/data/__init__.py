"""The course's text, without a download: byte-level token ids (vocabulary 256) from a fixed snapshot of CPython's
standard library shipped with the package, so every Python sees the same bytes.

``load_corpus("python")``: the top-level modules ``Lib/*.py`` of CPython 3.11.7 without generated files (build
flags, generated tables; rules in :mod:`moe_lab.data.build`); ``load_corpus("pydoc")``: the English ``help()``
topics of the same version, a second domain. Each is split **by document** with a fixed rule
(:func:`is_validation`: the SHA-256 of the document's name, 1 in 10 to validation), so training and validation text
come from the same distribution. :func:`val_windows` cuts validation text into the fixed windows that
:func:`moe_lab.train.evaluate` scores.

Shapes: ``data: [N]`` int64 token ids in ``[0, 256)``; batches and windows ``[B, L]``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..validation import check_int

SNAPSHOT = Path(__file__).resolve().with_name("corpus.tar.xz")
"""The packaged snapshot (written by :mod:`moe_lab.data.build`)."""
MANIFEST = "MANIFEST.json"
CORPORA = ("python", "pydoc")
VAL_SHARE = 10
"""One document in ``VAL_SHARE`` goes to validation (:func:`is_validation`)."""
SEPARATOR = b"\n\n"
"""Between documents when they are joined into one token stream."""


def is_validation(name: str) -> bool:
    """The split rule: document ``name`` (e.g. ``"Lib/abc.py"``, ``"topics/assert"``) is validation text iff the
    SHA-256 of its UTF-8 name, read as an integer, is divisible by :data:`VAL_SHARE`."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % VAL_SHARE == 0


@dataclass(frozen=True, eq=False)
class Corpus:
    """One domain of the snapshot, split by document. ``train: [N]`` and ``val: [M]`` int64 byte ids (documents in
    name order, joined by :data:`SEPARATOR`); ``train_documents`` / ``val_documents``: the document names;
    ``what``: what the text is; ``source``: the Python release it comes from."""

    name: str
    what: str
    source: str
    train: torch.Tensor = field(repr=False)
    val: torch.Tensor = field(repr=False)
    train_documents: tuple[str, ...] = field(repr=False)
    val_documents: tuple[str, ...] = field(repr=False)

    def describe(self) -> str:
        """One sentence for a notebook: what the text is, its size and its split (computed, never typed)."""
        return (f"{self.what} ({self.source}): {len(self.train):,} training bytes in {len(self.train_documents)} "
                f"documents, {len(self.val):,} validation bytes in {len(self.val_documents)} others (split by "
                f"document: 1 in {VAL_SHARE} by a hash of its name)")


@functools.lru_cache(maxsize=1)
def _snapshot() -> tuple[dict, dict[str, bytes]]:
    """``(manifest, {"<domain>/<document>": bytes})`` of the packaged archive (read once)."""
    with tarfile.open(SNAPSHOT, "r:xz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return json.loads(members.pop(MANIFEST)), members


def _tokens(docs: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(SEPARATOR.join(docs)), dtype=torch.uint8).long()


def load_corpus(name: str = "python") -> Corpus:
    """The ``"python"`` (standard-library source) or ``"pydoc"`` (``help()`` prose) corpus, split by document."""
    if name not in CORPORA:
        raise ValueError(f"name must be one of {CORPORA}, got {name!r}")
    manifest, members = _snapshot()
    docs = {m[len(name) + 1:]: text for m, text in sorted(members.items()) if m.startswith(name + "/")}
    val = [d for d in docs if is_validation(d)]
    train = [d for d in docs if not is_validation(d)]
    return Corpus(name=name, what=manifest[name]["what"], source=manifest["source"],
                  train=_tokens([docs[d] for d in train]), val=_tokens([docs[d] for d in val]),
                  train_documents=tuple(train), val_documents=tuple(val))


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data: [N]``: inputs ``x: [B, L]`` and next-token targets ``y: [B, L]``."""
    if len(data) <= seq_len:
        raise ValueError(f"seq_len must be < len(data)={len(data)}, got {seq_len}")
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    window = starts[:, None] + torch.arange(seq_len + 1)
    tokens = data[window]
    return tokens[:, :-1], tokens[:, 1:]


def val_windows(data: torch.Tensor, seq_len: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation windows of ``data: [N]``: cut ``data`` into consecutive, non-overlapping windows of
    ``seq_len`` tokens (each with its next-token targets) and keep ``tokens // seq_len`` of them evenly spaced
    over the whole text (all of them when ``tokens`` is None or larger). Returns ``x, y: [W, seq_len]``; the same
    windows for every model and batch size."""
    check_int("seq_len", seq_len, 1)
    available = (len(data) - 1) // seq_len
    if available < 1:
        raise ValueError(f"seq_len must be < len(data)={len(data)}, got {seq_len}")
    if tokens is not None:
        check_int("tokens", tokens, seq_len)
    count = available if tokens is None else min(available, tokens // seq_len)
    starts = (torch.arange(count) * available // count) * seq_len
    window = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[window]
    return chunk[:, :-1], chunk[:, 1:]


# Legacy: the installed interpreter's library, split by position. Notebooks 09-11 (and some tests) still use these
# until they move to load_corpus; their text depends on the Python version, so nothing computed from it is pinned.

def stdlib_files() -> list[Path]:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python source files found in the standard library folder {root}")
    return files


def stdlib_corpus(max_bytes: int = 1_000_000) -> torch.Tensor:
    """Legacy (use :func:`load_corpus`): up to ``max_bytes`` bytes of this interpreter's standard-library source
    (whole files in name order, separated by a blank line) as ``[N]`` int64 token ids."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    chunks, size = [], 0
    for path in stdlib_files():
        chunk = path.read_bytes() + b"\n\n"
        chunks.append(chunk)
        size += len(chunk)
        if size >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def pydoc_corpus(max_bytes: int = 1_000_000) -> torch.Tensor:
    """Legacy (use ``load_corpus("pydoc")``): up to ``max_bytes`` bytes of this interpreter's ``help()`` topics
    (``pydoc_data.topics``, in name order, separated by a blank line) as ``[N]`` int64 token ids."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")[:max_bytes]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def train_val_split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Legacy (use :func:`load_corpus`, split by document): a leading training and a trailing validation part."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]
