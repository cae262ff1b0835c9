"""Training data that needs no download: byte-level text from the Python standard library's own source files
(read from the running interpreter's installation) and, as a second domain, its English help topics.

Token ids are bytes (vocabulary 256); shapes: ``data: [N]`` int64, batches ``[B, L]``.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_files() -> list[Path]:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python source files found in the standard library folder {root}")
    return files


def stdlib_corpus(max_bytes: int = 1_000_000) -> torch.Tensor:
    """Up to ``max_bytes`` bytes of standard-library source (whole files in name order, separated by a blank
    line) as ``[N]`` int64 token ids in ``[0, 256)``. Which text depends on the Python version."""
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
    """Up to ``max_bytes`` bytes of English reference prose, a different domain from :func:`stdlib_corpus`'s
    source code: the help topics the standard library ships for ``help()`` (``pydoc_data.topics``; topics in
    name order, separated by a blank line) as ``[N]`` int64 token ids in ``[0, 256)``."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")[:max_bytes]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def train_val_split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[N]`` tokens into a leading training part and a trailing validation part."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data: [N]``: inputs ``x: [B, L]`` and next-token targets ``y: [B, L]``."""
    if len(data) <= seq_len:
        raise ValueError(f"seq_len must be < len(data)={len(data)}, got {seq_len}")
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=generator)
    window = starts[:, None] + torch.arange(seq_len + 1)
    tokens = data[window]
    return tokens[:, :-1], tokens[:, 1:]
