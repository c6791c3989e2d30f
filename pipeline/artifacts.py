"""The typed outputs stages hand each other: one frozen dataclass per artifact, with its checks.

Each stage writes its outputs through the artifact's ``save`` and reads its inputs through the
artifacts' ``load``; no stage module imports another. ``load`` is where the cross-stage checks
live, so every reader gets them: the files exist and parse, row counts agree, the class names
match by name (not by position), arrays have the dtype and shape the writer recorded, and a
downstream artifact was made from the upstream one it is being used with (the teacher's
SHA-256, the clean array's fingerprint). Every error names the file.

=====================  ==================  ===============================================
artifact               folder (default)    files
=====================  ==================  ===============================================
``CrawlStore``         ``data/crawl``      ``classes.json``, ``manifest.jsonl``, objects/
``CleanSet``           ``data/clean``      ``images.npy``, ``kept.jsonl``, ``report.json``
``TeacherRecord``      ``data/teacher``    ``teacher.json`` (+ the checkpoint it names)
``PseudoLabels``       ``data/label``      ``logits.npy``, ``report.json``
``ExportedStudent``    ``data/distill``    ``student.json``, ``student.pt``, ``student.ts``
``WorldTruth``         ``data/world``      ``truth.jsonl`` (demo only: evaluation, reports)
=====================  ==================  ===============================================

Heavy imports (torch, the teacher loader) happen inside the methods that need them, so reading
a JSON record never pulls in more than numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kd3util import sha256_file, write_json

if TYPE_CHECKING:
    import torch

    from distill.teacher import Teacher, TeacherSpec


class ArtifactError(ValueError):
    """A stage output is missing, damaged or does not belong with the others; the message names it."""


def _read_json(path: Path, what: str, hint: str) -> Any:
    if not path.is_file():
        raise ArtifactError(f"{path}: no {what} ({hint})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: damaged {what} ({e}); {hint}") from None


def _read_jsonl(path: Path, what: str, hint: str) -> list[dict[str, Any]]:
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


def _load_npy(path: Path, what: str, hint: str, mmap: bool) -> np.ndarray:
    """``np.load`` that never unpickles and names the file in every failure."""
    if not path.is_file():
        raise ArtifactError(f"{path}: no {what} ({hint})")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ArtifactError(f"{path}: damaged {what} ({first}); {hint}") from None


def check_classes(expected: Sequence[str], got: Sequence[str], expected_from: str, got_from: str) -> None:
    """Class identity is by name: raise naming the differences when two class lists disagree."""
    if list(expected) == list(got):
        return
    missing = [c for c in expected if c not in got]
    extra = [c for c in got if c not in expected]
    parts = []
    if missing:
        parts.append(f"in {expected_from} only: {', '.join(missing[:8])}")
    if extra:
        parts.append(f"in {got_from} only: {', '.join(extra[:8])}")
    if not parts:
        moved = [f"{c!r} {expected.index(c)}->{got.index(c)}" for c in expected if expected.index(c) != got.index(c)]
        parts.append(f"same names in another order ({', '.join(moved[:6])})")
    raise ArtifactError(f"the class lists of {expected_from} and {got_from} differ: " + "; ".join(parts))


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


# --------------------------------------------------------------------------------------------
# crawl
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrawlStore:
    """``kd3 crawl``: the content-addressed store, its manifest and the class list it was crawled for."""

    dir: Path
    classes: tuple[str, ...]

    HINT = "run kd3 crawl first"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.jsonl"

    @classmethod
    def load(cls, folder: str | Path) -> CrawlStore:
        folder = Path(folder)
        if not (folder / "manifest.jsonl").is_file():
            raise ArtifactError(f"{folder / 'manifest.jsonl'}: no crawl manifest ({cls.HINT})")
        raw = _read_json(folder / "classes.json", "crawl class list", cls.HINT)
        try:
            names = tuple(str(c["name"]) for c in raw)
        except (TypeError, KeyError):
            raise ArtifactError(f"{folder / 'classes.json'}: damaged crawl class list ({cls.HINT})") from None
        return cls(folder, names)

    @staticmethod
    def save_classes(folder: str | Path, classes: Sequence[Any]) -> None:
        """``classes``: objects with ``index``, ``name`` and ``slug`` (``crawl.classes.ClassName``)."""
        write_json(Path(folder) / "classes.json", [{"index": c.index, "name": c.name, "slug": c.slug} for c in classes])


# --------------------------------------------------------------------------------------------
# clean
# --------------------------------------------------------------------------------------------


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

    @property
    def query_class(self) -> int:
        """The class this image was crawled for, or -1 when several classes' queries found it."""
        return self.class_index if len(self.classes) <= 1 else -1

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

    @property
    def query_classes(self) -> np.ndarray:
        """(N,) int64: the class each image was crawled for (-1: several or unknown)."""
        return np.array([k.query_class for k in self.kept], dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        return str(self.report.get("images_fingerprint", ""))

    @classmethod
    def load(cls, folder: str | Path) -> CleanSet:
        folder = Path(folder)
        report = _read_json(folder / "report.json", "clean report", cls.HINT)
        images = _load_npy(folder / "images.npy", "packed image array", cls.HINT, mmap=True)
        kept = tuple(KeptImage.from_dict(r) for r in _read_jsonl(folder / "kept.jsonl", "kept list", cls.HINT))
        path = folder / "images.npy"
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ArtifactError(f"{path}: expected (N, S, S, 3) uint8, got {images.shape} {images.dtype} ({cls.HINT})")
        if not len(images) == len(kept) == report.get("kept", len(kept)):
            raise ArtifactError(f"{folder}: images.npy has {len(images)} rows, kept.jsonl {len(kept)} lines, "
                                f"report.json says {report.get('kept')} ({cls.HINT})")  # fmt: skip
        expected = report.get("images_fingerprint")
        if expected and array_fingerprint(images) != expected:
            raise ArtifactError(f"{path}: does not match the fingerprint in report.json (changed or damaged; "
                                f"{cls.HINT})")  # fmt: skip
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
        names = [f.name for f in dataclasses.fields(KeptImage) if f.name != "row"]
        with open(folder / "kept.jsonl", "w", encoding="utf-8") as f:
            for row, o in enumerate(kept):
                rec = {"row": row, **{k: o.get(k) for k in names}}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fingerprint = array_fingerprint(images)
        write_json(folder / "report.json", {**report, "class_names": list(classes), "images_fingerprint": fingerprint})


# --------------------------------------------------------------------------------------------
# teacher
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherRecord:
    """``kd3 teacher``: everything later stages need to load and feed the teacher."""

    format: str  # "state_dict" or "torchscript"
    arch: str | None
    classes: list[str]  # in the teacher's output order
    input_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    checkpoint: str
    sha256: str
    bytes: int
    feature_layer: str | None = None
    classifier_layer: str | None = None
    demo: dict[str, Any] | None = None  # how the demo teacher was trained

    FILE = "teacher.json"
    HINT = "run kd3 teacher first"

    @classmethod
    def load(cls, folder: str | Path) -> TeacherRecord:
        path = Path(folder) / cls.FILE
        raw = _read_json(path, "teacher record", cls.HINT)
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as e:
            raise ArtifactError(f"{path}: damaged teacher record ({e}); {cls.HINT}") from None

    def save(self, folder: str | Path) -> None:
        record = dataclasses.asdict(self)
        if record["demo"] is None:
            del record["demo"]
        write_json(Path(folder) / self.FILE, record)

    def spec(self, **limits: Any) -> TeacherSpec:
        from distill.teacher import TeacherSpec

        return TeacherSpec(checkpoint=self.checkpoint, num_classes=len(self.classes), format=self.format,
                           arch=self.arch, in_chans=self.in_chans, feature_layer=self.feature_layer,
                           classifier_layer=self.classifier_layer, **limits)  # fmt: skip

    def load_teacher(self) -> Teacher:
        """The frozen teacher, after checking the checkpoint still has the recorded SHA-256."""
        from distill.teacher import load_teacher

        ckpt = Path(self.checkpoint)
        if ckpt.is_file() and sha256_file(ckpt) != self.sha256:
            raise ArtifactError(f"{ckpt}: changed since the teacher stage ran (run kd3 teacher / dvc repro)")
        return load_teacher(self.spec(), self.mean, self.std, self.input_size)


# --------------------------------------------------------------------------------------------
# label
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PseudoLabels:
    """``kd3 label``: the teacher's logits on every clean image (row i = row i of the clean array)."""

    dir: Path
    logits: np.ndarray  # (N, K) float16
    report: dict[str, Any]

    HINT = "run kd3 label"

    @property
    def teacher_sha256(self) -> str:
        return str(self.report.get("teacher_sha256", ""))

    @classmethod
    def load(cls, folder: str | Path, clean: CleanSet, teacher: TeacherRecord) -> PseudoLabels:
        """The label stage's outputs, checked against the clean set and teacher they are used with."""
        folder = Path(folder)
        report = _read_json(folder / "report.json", "label report", cls.HINT)
        logits = _load_npy(folder / "logits.npy", "teacher logits", cls.HINT, mmap=False)
        path = folder / "logits.npy"
        if logits.ndim != 2 or logits.shape[1] != len(teacher.classes) or not np.issubdtype(logits.dtype, np.floating):
            raise ArtifactError(f"{path}: expected (N, {len(teacher.classes)}) floats, got {logits.shape} "
                                f"{logits.dtype} ({cls.HINT})")  # fmt: skip
        if report.get("teacher_sha256") != teacher.sha256:
            raise ArtifactError(f"{folder}: labelled by another teacher than the current record ({cls.HINT})")
        if len(logits) != len(clean.kept):
            raise ArtifactError(f"{path}: {len(logits)} rows but the clean set {clean.dir} has {len(clean.kept)} "
                                f"images ({cls.HINT})")  # fmt: skip
        if report.get("images_fingerprint") and report["images_fingerprint"] != clean.fingerprint:
            raise ArtifactError(f"{folder}: labelled another clean set than {clean.dir} ({cls.HINT})")
        if not np.isfinite(logits).all():
            raise ArtifactError(f"{path}: holds non-finite logits ({cls.HINT}; check the teacher)")
        return cls(folder, logits, report)

    @staticmethod
    def save(folder: str | Path, logits: np.ndarray, report: dict[str, Any]) -> None:
        from kd3util import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "logits.npy") as tmp:
            np.save(tmp, logits.astype(np.float16))
        write_json(folder / "report.json", report)


# --------------------------------------------------------------------------------------------
# distill
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedStudent:
    """``kd3 distill``: the deployable student and the record of how it was made."""

    dir: Path
    meta: dict[str, Any]

    HINT = "run kd3 distill first"

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @classmethod
    def load(cls, folder: str | Path, teacher: TeacherRecord | None = None) -> ExportedStudent:
        folder = Path(folder)
        meta = _read_json(folder / "student.json", "exported student", cls.HINT)
        if teacher is not None and meta.get("teacher_sha256") != teacher.sha256:
            raise ArtifactError(f"{folder}: the student was distilled from another teacher ({cls.HINT})")
        return cls(folder, meta)

    def load_model(self) -> torch.nn.Module:
        """The TorchScript student, checked against the record's SHA-256."""
        from distill.export import load_exported

        model, _ = load_exported(self.dir)
        return model


# --------------------------------------------------------------------------------------------
# the demo world's ground truth
# --------------------------------------------------------------------------------------------


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
        for t in _read_jsonl(path, "world truth", "run kd3 world"):
            if t.get("sha256"):
                by_sha[t["sha256"]] = "" if t.get("kind") == "broken" else str(t.get("truth", ""))
        return cls(path, by_sha)

    def labels(self, keys: Sequence[str], classes: Sequence[str]) -> np.ndarray:
        """(N,) int64 class index of each key in ``classes`` order; -1 for junk, broken or unknown."""
        index = {c: k for k, c in enumerate(classes)}
        return np.array([index.get(self.by_sha.get(k, ""), -1) for k in keys], dtype=np.int64)
