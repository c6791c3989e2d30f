"""Demo only: the offline world's ground truth, for evaluation and reports (never for training)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import read_jsonl


@dataclass(frozen=True)
class WorldTruth:
    """Demo only: the true class of each world file by SHA-256 ("junk" or broken: no class).

    Only evaluation and reports read it (selection precision, pseudo-label accuracy); training never does.
    """

    path: Path
    by_sha: dict[str, str]  # sha256 -> class name, or "" for junk and broken files

    @classmethod
    def load(cls, path: str | Path) -> WorldTruth:
        path = Path(path)
        by_sha: dict[str, str] = {}
        for t in read_jsonl(path, "world truth", "run kd3 world"):
            if t.get("sha256"):
                by_sha[t["sha256"]] = "" if t.get("kind") == "broken" else str(t.get("truth", ""))
        return cls(path, by_sha)

    def labels(self, keys: Sequence[str], classes: Sequence[str]) -> np.ndarray:
        """(N,) int64 class index of each key in ``classes`` order; -1 for junk, broken or unknown."""
        index = {c: k for k, c in enumerate(classes)}
        return np.array([index.get(self.by_sha.get(k, ""), -1) for k in keys], dtype=np.int64)
