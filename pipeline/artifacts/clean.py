"""The clean stage's packed pool: ``images.npy`` and one ``KeptImage`` per row."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crawl.classes import normalise
from kd3util import write_json
from pipeline.artifacts import ArtifactError, array_fingerprint, index_by_name, load_npy, read_json, read_jsonl


@dataclass(frozen=True)
class KeptImage:
    """One line of ``kept.jsonl``: row ``row`` of ``images.npy`` and where it came from."""

    row: int
    sha256: str
    path: str
    class_name: str  # the class whose query found it first
    class_index: int
    classes: list[str] = field(default_factory=list)  # every class whose queries found it
    query: str | None = None
    engine: str | None = None
    rank: int | None = None
    url: str | None = None
    num_urls: int = 1
    format: str | None = None
    width: int | None = None
    height: int | None = None
    phash: str | None = None
    std: float | None = None
    entropy: float | None = None
    warnings: list[str] | None = None

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> KeptImage:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class CleanSet:
    """``kd3 clean``: the packed pool every later stage reads, one ``KeptImage`` per row."""

    dir: Path
    classes: tuple[str, ...]
    images: np.ndarray  # (N, S, S, 3) uint8, memory-mapped
    kept: tuple[KeptImage, ...]
    report: dict[str, Any]

    HINT = "run kd3 clean"

    @property
    def keys(self) -> list[str]:
        return [k.sha256 for k in self.kept]

    def query_classes(self, order: Sequence[str]) -> np.ndarray:
        """(N,) int64: the class each image was crawled for, as an index into ``order`` (matched by name).

        -1 where several classes' queries found the image, or its class is not in ``order``.
        """
        index = index_by_name(order)
        return np.array(
            [index.get(normalise(k.class_name), -1) if len(k.classes) <= 1 else -1 for k in self.kept], dtype=np.int64
        )

    @property
    def fingerprint(self) -> str:
        return str(self.report.get("images_fingerprint", ""))

    @classmethod
    def load(cls, folder: str | Path) -> CleanSet:
        folder = Path(folder)
        report = read_json(folder / "report.json", "clean report", cls.HINT)
        images = load_npy(folder / "images.npy", "packed image array", cls.HINT, mmap=True)
        kept = tuple(KeptImage.from_dict(r) for r in read_jsonl(folder / "kept.jsonl", "kept list", cls.HINT))
        path = folder / "images.npy"
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ArtifactError(f"{path}: expected (N, S, S, 3) uint8, got {images.shape} {images.dtype} ({cls.HINT})")
        if not len(images) == len(kept) == report.get("kept", len(kept)):
            raise ArtifactError(
                f"{folder}: images.npy has {len(images)} rows, kept.jsonl {len(kept)} lines, "
                f"report.json says {report.get('kept')} ({cls.HINT})"
            )
        expected = report.get("images_fingerprint")
        if expected and array_fingerprint(images) != expected:
            raise ArtifactError(
                f"{path}: does not match the fingerprint in report.json (changed or damaged; {cls.HINT})"
            )
        if not report.get("class_names"):
            raise ArtifactError(f"{folder / 'report.json'}: records no class names ({cls.HINT})")
        return cls(folder, tuple(report["class_names"]), images, kept, report)

    @staticmethod
    def save_index(
        folder: Path, kept: Sequence[dict[str, Any]], report: dict[str, Any], classes: Sequence[str]
    ) -> None:
        """Write ``kept.jsonl`` and ``report.json`` beside an ``images.npy`` already written in ``folder``.

        The report gains the class names and the array's fingerprint, which ``load`` checks.
        """
        images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
        if len(images) != len(kept):
            raise ArtifactError(f"{folder}: {len(images)} rows in images.npy but {len(kept)} kept records")
        required = [
            x.name
            for x in dataclasses.fields(KeptImage)
            if x.name != "row" and x.default is MISSING and x.default_factory is MISSING
        ]
        with open(folder / "kept.jsonl", "w", encoding="utf-8") as f:
            for row, o in enumerate(kept):
                if absent := [k for k in required if k not in o]:
                    raise ArtifactError(f"{folder}: kept record {row} lacks {', '.join(absent)}")
                rec = dataclasses.asdict(KeptImage.from_dict({**o, "row": row}))  # absent keys: the defaults
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fingerprint = array_fingerprint(images)
        write_json(folder / "report.json", {**report, "class_names": list(classes), "images_fingerprint": fingerprint})
