"""Export the deployable student: weights + a TorchScript archive that carries its own preprocessing.

The exported module takes float RGB images in [0, 1], shaped (B, C, S, S) at the teacher's input
size, normalises them with the teacher's mean/std and returns logits in the class order of
``meta["classes"]``. For ``kd3`` it is backbone + projector + the copied teacher classifier (the
contrastive head is training-only and dropped). ``meta`` travels inside the archive
(``extra_files["kd3.json"]``) and beside it as ``student.json``.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd3util import atomic_path, sha256_file, write_json


class Deployable(nn.Module):
    """The exported student: normalisation baked in, the training-only head removed."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, student: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.student = copy.deepcopy(student).cpu().eval()
        if getattr(self.student, "head", None) is not None:
            self.student.head = None  # type: ignore[assignment]  # training-only contrastive head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student((x - self.mean) / self.std)


def export_student(student: nn.Module, out_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``student.pt`` (state_dict), ``student.ts`` (TorchScript) and ``student.json``; returns the record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = Deployable(student, meta["mean"], meta["std"]).eval()
    example = torch.rand(2, meta["in_chans"], meta["input_size"], meta["input_size"])
    weights, script = out_dir / "student.pt", out_dir / "student.ts"
    with atomic_path(weights) as tmp_w, atomic_path(script) as tmp_s:
        torch.save(model.state_dict(), tmp_w)
        with warnings.catch_warnings(), torch.no_grad():  # torch.jit is deprecated in 2.14 but still what users load
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(tmp_s), _extra_files={"kd3.json": json.dumps(meta)})
            check = torch.jit.load(str(tmp_s))
            if not torch.allclose(check(example), model(example), atol=1e-4, rtol=1e-4):
                raise RuntimeError("TorchScript export does not reproduce the student's outputs")
    record = {
        **meta,
        "weights": weights.name,
        "torchscript": script.name,
        "weights_sha256": sha256_file(weights),
        "torchscript_sha256": sha256_file(script),
    }
    write_json(out_dir / "student.json", record)
    return record


def load_exported(out_dir: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The exported student, after checking the archive against the record's SHA-256."""
    path = Path(out_dir) / "student.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported student (run kd3 distill first)")
    record = json.loads(path.read_text())
    script = Path(out_dir) / record["torchscript"]
    if sha256_file(script) != record["torchscript_sha256"]:
        raise ValueError(f"{script}: does not match {path} (changed since export)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(script), map_location="cpu")
    return model.eval(), record
