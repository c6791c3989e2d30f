"""The label stage's pseudo-labels: the teacher's logits on every row of the clean array."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd3util import atomic_path, write_json
from pipeline.artifacts import ArtifactError, load_npy, read_json
from pipeline.artifacts.clean import CleanSet
from pipeline.artifacts.teacher import TeacherRecord


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
        report = read_json(folder / "report.json", "label report", cls.HINT)
        logits = load_npy(folder / "logits.npy", "teacher logits", cls.HINT, mmap=False)
        path = folder / "logits.npy"
        if logits.ndim != 2 or logits.shape[1] != len(teacher.classes) or not np.issubdtype(logits.dtype, np.floating):
            raise ArtifactError(
                f"{path}: expected (N, {len(teacher.classes)}) floats, got {logits.shape} {logits.dtype} ({cls.HINT})"
            )
        if report.get("teacher_sha256") != teacher.sha256:
            raise ArtifactError(f"{folder}: labelled by another teacher than the current record ({cls.HINT})")
        if len(logits) != len(clean.kept):
            raise ArtifactError(
                f"{path}: {len(logits)} rows but the clean set {clean.dir} has {len(clean.kept)} images ({cls.HINT})"
            )
        if report.get("images_fingerprint") and report["images_fingerprint"] != clean.fingerprint:
            raise ArtifactError(f"{folder}: labelled another clean set than {clean.dir} ({cls.HINT})")
        if not np.isfinite(logits).all():
            raise ArtifactError(f"{path}: holds non-finite logits ({cls.HINT}; check the teacher)")
        return cls(folder, logits, report)

    @staticmethod
    def save(folder: str | Path, logits: np.ndarray, report: dict[str, Any]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "logits.npy") as tmp:
            np.save(tmp, logits.astype(np.float16))
        write_json(folder / "report.json", report)
