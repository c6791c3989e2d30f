"""The teacher stage's record: how to load and feed the teacher, and the checkpoint's SHA-256."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kd3util import sha256_file, write_json
from pipeline.artifacts import ArtifactError, read_json

if TYPE_CHECKING:
    from distill.teacher import Teacher, TeacherSpec


@dataclass(frozen=True)
class TeacherRecord:
    """``kd3 teacher``: everything later stages need to load and feed the teacher."""

    format: Literal["state_dict", "torchscript"]
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
        raw = read_json(path, "teacher record", cls.HINT)
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

        return TeacherSpec(
            checkpoint=self.checkpoint,
            num_classes=len(self.classes),
            format=self.format,
            arch=self.arch,
            in_chans=self.in_chans,
            feature_layer=self.feature_layer,
            classifier_layer=self.classifier_layer,
            **limits,
        )

    def load_teacher(self) -> Teacher:
        """The frozen teacher, after checking the checkpoint still has the recorded SHA-256."""
        from distill.teacher import load_teacher

        ckpt = Path(self.checkpoint)
        if ckpt.is_file() and sha256_file(ckpt) != self.sha256:
            raise ArtifactError(f"{ckpt}: changed since the teacher stage ran (run kd3 teacher / dvc repro)")
        return load_teacher(self.spec(), self.mean, self.std, self.input_size)
