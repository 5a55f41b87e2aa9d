"""Byte-level text corpora that need no download, and deterministic batching.

Default corpus: the English text of Python's documentation topics
(``pydoc_data.topics.topics``, ~0.47 MB shipped with every CPython). ``stdlib=True`` adds the
standard library's own ``.py`` sources (tens of MB). ``path=`` reads any text file instead.

Tokens are raw UTF-8 bytes (vocabulary 256). The corpus is cut into chunks of
``chunk`` bytes and every ``1/val_fraction``-th chunk is held out for validation, so the
validation text is spread over the whole corpus but never seen in training.

Batches are drawn from a ``torch.Generator`` seeded once per run, so every optimizer sees the
same windows in the same order; validation uses a fixed set of evenly spaced windows.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass

import torch

__all__ = ["load_text", "Corpus", "make_corpus", "Batches"]


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _stdlib_sources(max_bytes: int | None = None) -> str:
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    s = fh.read()
            except (OSError, UnicodeDecodeError):
                continue
            parts.append(s)
            total += len(s)
            if max_bytes is not None and total >= max_bytes:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


def load_text(path: str | None = None, stdlib: bool = False, max_bytes: int | None = None) -> tuple[str, str]:
    """Return (text, description)."""
    if path is not None:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        desc = f"file {path}"
    else:
        text, desc = _pydoc_topics(), "pydoc_data.topics"
        if stdlib:
            text += "\n\n" + _stdlib_sources(max_bytes)
            desc += " + stdlib sources"
    if max_bytes is not None:
        text = text[:max_bytes]
    return text, desc


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 byte tokens
    val: torch.Tensor
    description: str

    @property
    def vocab_size(self) -> int:
        return 256


def make_corpus(
    path: str | None = None,
    stdlib: bool = False,
    max_bytes: int | None = None,
    val_fraction: float = 0.1,
    chunk: int = 4096,
) -> Corpus:
    text, desc = load_text(path, stdlib, max_bytes)
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    if data.numel() < 4 * chunk:
        raise ValueError(f"corpus {desc!r} is too small ({data.numel()} bytes)")
    n_chunks = (data.numel() + chunk - 1) // chunk
    every = max(2, round(1 / val_fraction))
    is_val = (torch.arange(n_chunks) % every) == every - 1
    chunks = list(torch.split(data, chunk))
    train = torch.cat([c for c, v in zip(chunks, is_val.tolist()) if not v])
    val = torch.cat([c for c, v in zip(chunks, is_val.tolist()) if v])
    return Corpus(train=train, val=val, description=f"{desc}: {data.numel():,} bytes, "
                  f"{train.numel():,} train / {val.numel():,} val")


class Batches:
    """Deterministic (x, y) batches of ``batch`` windows of ``ctx`` tokens."""

    def __init__(self, corpus: Corpus, batch: int, ctx: int, seed: int, device="cpu"):
        if corpus.train.numel() <= ctx + 1 or corpus.val.numel() <= ctx + 1:
            raise ValueError(f"context {ctx} is longer than the corpus splits")
        self.corpus, self.batch, self.ctx, self.device = corpus, batch, ctx, torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(self.ctx + 1)[None, :]
        w = data[idx].long()
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def next(self, batch: int | None = None):
        b = batch or self.batch
        starts = torch.randint(0, self.corpus.train.numel() - self.ctx - 1, (b,), generator=self.gen)
        return self._windows(self.corpus.train, starts)

    def val_batches(self, n_batches: int, batch: int | None = None):
        """A fixed list of validation batches: windows evenly spaced over the validation split."""
        b = batch or self.batch
        n = n_batches * b
        hi = self.corpus.val.numel() - self.ctx - 1
        starts = torch.linspace(0, hi, n).long()
        return [self._windows(self.corpus.val, starts[i * b:(i + 1) * b]) for i in range(n_batches)]
