"""The distill stage's exported student and the record of how it was made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import ArtifactError, read_json
from pipeline.artifacts.teacher import TeacherRecord

if TYPE_CHECKING:
    import torch


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
        meta = read_json(folder / "student.json", "exported student", cls.HINT)
        if teacher is not None and meta.get("teacher_sha256") != teacher.sha256:
            raise ArtifactError(f"{folder}: the student was distilled from another teacher ({cls.HINT})")
        return cls(folder, meta)

    def load_model(self) -> torch.nn.Module:
        """The TorchScript student, checked against the record's SHA-256."""
        from distill.export import load_exported

        model, _ = load_exported(self.dir)
        return model
