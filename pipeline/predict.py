"""``kd3 predict``: the exported student on an image file or a folder of them, batched, on the CPU.

Images are read as the evaluate stage reads a labelled folder: the clean stage's safe decoder with
its default limits (byte, pixel and frame caps, format allow-list), then the shorter side resized
to the student's input size and centre-cropped. A file that cannot be used is skipped with its
reason code (``too_large``, ``corrupt``, ``unidentified``, ``unreadable``, ...) and counted; it
never stops the run. The student is rebuilt from ``student.pt`` (``distill.export.load_student``),
so no code from an archive runs.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from kd3util import atomic_path
from pipeline.evalset import IMAGE_SUFFIXES


@dataclass
class Skipped:
    path: Path
    reason: str
    detail: str = ""


@dataclass
class Tally:
    """What a run did: images predicted and files skipped, by reason."""

    predicted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in self.skipped.most_common())
        return f"predict: {self.predicted} images, {sum(self.skipped.values())} skipped" + (
            f" ({reasons})" if reasons else ""
        )


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or every image file under the folder (by suffix, recursively, sorted; links not followed)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def _load(path: Path, size: int) -> np.ndarray | Skipped:
    """(size, size, 3) uint8, or why the file was skipped."""
    from crawl.images import ImageRejected, decode_image, resize_square  # imagehash comes with it
    from crawl.settings import DecodeLimits

    limits = DecodeLimits()
    try:
        if path.stat().st_size > limits.max_bytes:  # before reading a byte of it
            return Skipped(path, "too_large", f"{path.stat().st_size} bytes")
        data = path.read_bytes()
    except OSError as e:
        return Skipped(path, "unreadable", e.strerror or type(e).__name__)
    try:
        return resize_square(decode_image(data, limits, draft=size).image, size, "crop")
    except ImageRejected as e:
        return Skipped(path, e.reason, str(e).removeprefix(f"{e.reason}: "))


def predict_files(
    files: list[Path],
    model: Callable[[torch.Tensor], torch.Tensor],
    record: dict[str, Any],
    *,
    top_k: int,
    batch_size: int,
    on_skip: Callable[[Skipped], None],
) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """(path, [(class, confidence), ...] best first) per readable file, in order, ``batch_size`` at a time."""
    from distill.data import to_float

    classes, size, chans = record["classes"], record["input_size"], record["in_chans"]
    k = min(top_k, len(classes))
    cpu = torch.device("cpu")
    for start in range(0, len(files), batch_size):
        paths, images = [], []
        for f in files[start : start + batch_size]:
            got = _load(f, size)
            if isinstance(got, Skipped):
                on_skip(got)
            else:
                paths.append(f)
                images.append(got)
        if not images:
            continue
        with torch.inference_mode():
            probs = torch.softmax(model(to_float(np.stack(images), size, cpu, chans)).float(), dim=1)
        conf, idx = probs.topk(k, dim=1)
        for p, c, i in zip(paths, conf.tolist(), idx.tolist(), strict=True):
            yield p, [(classes[j], v) for j, v in zip(i, c, strict=True)]


def _header(k: int) -> list[str]:
    cols = ["path", "class", "confidence"]
    for r in range(2, k + 1):
        cols += [f"class_{r}", f"confidence_{r}"]
    return cols


def _row(path: Path, ranked: list[tuple[str, float]]) -> list[str]:
    return [str(path)] + [x for name, conf in ranked for x in (name, f"{conf:.4f}")]


def run(
    path: Path,
    student_dir: Path,
    *,
    top_k: int = 1,
    batch_size: int = 64,
    out: Path | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> dict[str, Any]:
    """Predict every image at ``path``; TSV lines on ``stdout``, or a CSV at ``out`` (written atomically)."""
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"--top-k and --batch-size: expected integers >= 1, got {top_k} and {batch_size}")
    from distill.export import load_student

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    files = image_files(path)
    model, record = load_student(student_dir)
    k = min(top_k, len(record["classes"]))
    tally = Tally()

    def skip(s: Skipped) -> None:
        tally.skipped[s.reason] += 1
        print(
            f"skipped {s.path}: {s.reason}" + (f" ({s.detail})" if s.detail and s.detail != s.reason else ""),
            file=stderr,
        )

    rows = predict_files(files, model, record, top_k=k, batch_size=batch_size, on_skip=skip)
    if out is None:
        for p, ranked in rows:
            tally.predicted += 1
            print("\t".join(_row(p, ranked)), file=stdout, flush=True)
    else:
        with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(_header(k))
            for p, ranked in rows:
                tally.predicted += 1
                writer.writerow(_row(p, ranked))
    print(tally.summary() + (f"; wrote {out}" if out else ""), file=stderr)
    if not files:
        print(f"predict: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}", file=stderr)
    return {"predicted": tally.predicted, "skipped": dict(tally.skipped), "files": len(files)}
