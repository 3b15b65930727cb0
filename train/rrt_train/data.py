"""The corpus written by `rrt distill-data`: `train.jsonl`, `heldout.jsonl` (one tokenized
document per line) and `manifest.json`.

Documents of a split are joined into one stream with the separator token between them;
training batches are windows at random offsets drawn from a seeded `torch.Generator` (its state
is saved with the run, so a resumed run draws the same batches), and evaluation uses fixed,
non-overlapping windows of the held-out stream, which training never reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


class DataError(ValueError):
    pass


class Corpus:
    def __init__(self, path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        try:
            self.manifest = json.loads(mpath.read_text())
        except FileNotFoundError as e:
            raise DataError(f"{mpath}: not found (build the corpus with `rrt distill-data --out {self.path}`)") from e
        if self.manifest.get("format") != "rrt-distill-data":
            raise DataError(f"{mpath}: not an rrt-distill-data manifest")
        self.manifest_sha256 = hashlib.sha256(mpath.read_bytes()).hexdigest()
        sep = self.manifest.get("separator")
        self.train = self._stream("train.jsonl", sep)
        self.heldout = self._stream("heldout.jsonl", sep)

    def _stream(self, name: str, sep) -> torch.Tensor:
        ids: list[int] = []
        p = self.path / name
        with open(p) as f:
            for n, line in enumerate(f, 1):
                try:
                    doc = json.loads(line)["ids"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{p}:{n}: not a document line: {e}") from e
                ids.extend(doc)
                if sep is not None:
                    ids.append(sep)
        t = torch.tensor(ids, dtype=torch.long)
        vocab = self.manifest.get("vocab")
        if len(t) and vocab is not None and (t.min() < 0 or t.max() >= vocab):
            raise DataError(f"{p}: token ids outside the vocabulary of {vocab}")
        return t

    def check_vocab(self, vocab: int) -> None:
        if self.manifest.get("vocab") != vocab:
            raise DataError(f"corpus vocabulary {self.manifest.get('vocab')} != model vocabulary {vocab}")

    def batch(self, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
        """`[batch, seq + 1]` windows of the training stream at random offsets."""
        n = len(self.train) - seq - 1
        if n <= 0:
            raise DataError(f"training stream of {len(self.train)} tokens is shorter than a window of {seq + 1}")
        starts = torch.randint(0, n, (batch,), generator=gen)
        return torch.stack([self.train[s : s + seq + 1] for s in starts.tolist()])

    def heldout_windows(self, seq: int, count: int) -> torch.Tensor:
        """Up to `count` fixed, non-overlapping `[seq + 1]` windows of the held-out stream."""
        n = min(count, (len(self.heldout) - 1) // seq)
        if n <= 0:
            raise DataError(f"held-out stream of {len(self.heldout)} tokens is shorter than a window of {seq + 1}")
        stride = (len(self.heldout) - seq - 1) // max(n - 1, 1) if n > 1 else 0
        stride = max(stride, seq)
        return torch.stack([self.heldout[i * stride : i * stride + seq + 1] for i in range(n)])


def write_corpus(path, train_docs: list[list[int]], heldout_docs: list[list[int]], vocab: int, separator: int | None = 0):
    """A small corpus in the same format (tests)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train.jsonl", train_docs), ("heldout.jsonl", heldout_docs)):
        with open(path / name, "w") as f:
            for d in docs:
                f.write(json.dumps({"source": "test", "ids": d}) + "\n")
    manifest = {
        "format": "rrt-distill-data",
        "version": 1,
        "tool": "rrt_train.data.write_corpus",
        "model_sha256": "0" * 64,
        "vocab": vocab,
        "separator": separator,
        "train": {"tokens": sum(map(len, train_docs))},
        "heldout": {"tokens": sum(map(len, heldout_docs))},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
