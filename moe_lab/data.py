"""Training data that needs no download: byte-level text from the Python standard library's own source files
(read from the running interpreter's installation), and a synthetic multi-domain dataset with known domains.

Token ids are bytes (vocabulary 256) for the corpus; shapes: ``data: [N]`` int64, batches ``[B, L]``.
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


def synthetic_domains(num_sequences: int, seq_len: int, num_domains: int = 4, tokens_per_domain: int = 16,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences from ``num_domains`` known "languages": domain ``d`` uses only token ids
    ``[d*V_d, (d+1)*V_d)`` (``V_d = tokens_per_domain``) and its own random first-order Markov chain.

    Returns ``tokens: [num_sequences, seq_len]`` int64 (vocabulary ``num_domains * V_d``) and
    ``domains: [num_sequences]`` int64, the ground truth an expert-specialisation plot can be checked against.
    """
    for name, value in (("num_sequences", num_sequences), ("seq_len", seq_len), ("num_domains", num_domains),
                        ("tokens_per_domain", tokens_per_domain)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    g = torch.Generator().manual_seed(seed)
    # peaked transition matrices: each domain has its own predictable structure
    transitions = torch.softmax(3 * torch.randn(num_domains, tokens_per_domain, tokens_per_domain, generator=g), -1)
    domains = torch.randint(num_domains, (num_sequences,), generator=g)
    local = torch.empty(num_sequences, seq_len, dtype=torch.long)
    local[:, 0] = torch.randint(tokens_per_domain, (num_sequences,), generator=g)
    for t in range(1, seq_len):
        probs = transitions[domains, local[:, t - 1]]  # [N, V_d]
        local[:, t] = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return local + domains[:, None] * tokens_per_domain, domains
