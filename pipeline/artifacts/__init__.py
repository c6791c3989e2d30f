"""The typed outputs stages hand each other: one frozen dataclass per artifact, with its checks.

Each stage writes its outputs through the artifact's ``save`` and reads its inputs through the
artifacts' ``load``; no stage module imports another. ``load`` is where the cross-stage checks
live, so every reader gets them: the files exist and parse, row counts agree, the class names
match by name (not by position), arrays have the dtype and shape the writer recorded, and a
downstream artifact was made from the upstream one it is being used with (the teacher's
SHA-256, the clean array's fingerprint). Every error names the file.

==============================  ===============  ============================================
artifact                        folder           files
==============================  ===============  ============================================
``crawl.CrawlStore``            ``data/crawl``   ``classes.json``, ``manifest.jsonl``, objects/
``clean.CleanSet``              ``data/clean``   ``images.npy``, ``kept.jsonl``, ``report.json``
``teacher.TeacherRecord``       ``data/teacher`` ``teacher.json`` (+ the checkpoint it names)
``label.PseudoLabels``          ``data/label``   ``logits.npy``, ``report.json``
``student.ExportedStudent``     ``data/distill`` ``student.json``, ``student.pt``, ``student.ts``
``world.WorldTruth``            ``data/world``   ``truth.jsonl`` (demo only: evaluation, reports)
==============================  ===============  ============================================

One module per artifact, so a stage imports (and ``dvc.yaml`` makes it depend on) only the
artifacts it reads or writes; this ``__init__`` holds what they share. Heavy imports (torch, the
teacher loader) happen inside the methods that need them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crawl.classes import normalise  # the class-file parser's normalisation: names compare as it reads them


class ArtifactError(ValueError):
    """A stage output is missing, damaged or does not belong with the others; the message names it."""


def read_json(path: Path, what: str, hint: str) -> Any:
    if not path.is_file():
        raise ArtifactError(f"{path}: no {what} ({hint})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: damaged {what} ({e}); {hint}") from None


def read_jsonl(path: Path, what: str, hint: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ArtifactError(f"{path}: no {what} ({hint})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{path}:{n}: damaged {what} line ({e}); {hint}") from None
            if not isinstance(row, dict):
                raise ArtifactError(f"{path}:{n}: damaged {what} line (not an object); {hint}")
            rows.append(row)
    return rows


def load_npy(path: Path, what: str, hint: str, mmap: bool) -> np.ndarray:
    """``np.load`` that never unpickles and names the file in every failure."""
    if not path.is_file():
        raise ArtifactError(f"{path}: no {what} ({hint})")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ArtifactError(f"{path}: damaged {what} ({first}); {hint}") from None


def check_classes(expected: Sequence[str], got: Sequence[str], expected_from: str, got_from: str) -> None:
    """Class identity is by name: raise naming the differences when two class lists hold other names.

    The order may differ (a teacher's output order need not be the crawl's); readers map by name.
    """
    have = {normalise(c) for c in got}
    want = {normalise(c) for c in expected}
    missing = [c for c in expected if normalise(c) not in have]
    extra = [c for c in got if normalise(c) not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"only in {expected_from}: {', '.join(map(repr, missing[:8]))}")
        if extra:
            parts.append(f"only in {got_from}: {', '.join(map(repr, extra[:8]))}")
        raise ArtifactError(
            f"the class names of {expected_from} and {got_from} differ ({'; '.join(parts)}); "
            "class identity is by name, so both must list the same classes"
        )


def index_by_name(order: Sequence[str]) -> dict[str, int]:
    """Normalised class name -> its position in ``order`` (a teacher's output order)."""
    return {normalise(c): k for k, c in enumerate(order)}


def array_fingerprint(images: np.ndarray, samples: int = 64) -> str:
    """A cheap identity of a packed array: dtype, shape and a strided sample of rows (plus the last).

    Reading 65 rows costs milliseconds at any pool size; it catches a swapped, truncated, re-packed
    or reshaped array, and most corruption, without hashing gigabytes at every stage start.
    """
    h = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    n = len(images)
    if n:
        for i in sorted({*range(0, n, max(1, n // samples)), n - 1}):
            h.update(np.ascontiguousarray(images[i]).tobytes())
    return h.hexdigest()[:32]
