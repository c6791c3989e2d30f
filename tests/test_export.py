"""The exported student: plain weights that load into the architecture, three runnable formats that agree, a card."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distill.export import export_student, load_exported, load_student
from distill.methods.kd3 import KD3Student
from distill.models import build_model

CLASSES = ["T-shirt/top", "Trouser", "Bag"]
META = {
    "method": "kd",
    "student": "resnet8",
    "classes": CLASSES,
    "input_size": 32,
    "in_chans": 3,
    "mean": [0.5, 0.4, 0.3],
    "std": [0.25, 0.2, 0.3],
    "input": "float RGB in [0, 1], (B, C, S, S)",
    "teacher_sha256": "ab" * 32,
    "holdout": 0.1,
    "clean_dir": "data/clean",
}


def _settle_batchnorm(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a format that ignores them cannot pass the parity checks."""
    torch.manual_seed(0)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return net.eval()


def _kd3_student() -> KD3Student:
    """What KD3Method builds: a student backbone, the teacher's classifier, the projector and the head."""
    teacher = build_model("resnet8", len(CLASSES))
    student = KD3Student(build_model("resnet8", len(CLASSES)), teacher.classifier, 64, 8, contrastive=True)
    _settle_batchnorm(student)
    return student


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    net = _settle_batchnorm(build_model("resnet8", len(CLASSES)))
    out = tmp_path_factory.mktemp("plain")
    export_student(net, out, META)
    return out, net


@pytest.fixture(scope="module")
def kd3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, KD3Student]:
    student = _kd3_student()
    out = tmp_path_factory.mktemp("kd3")
    export_student(student, out, {**META, "method": "kd3", "train_images": 86, "val_accuracy": 0.75})
    return out, student


def _images(n: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(META["mean"]).view(1, -1, 1, 1)) / torch.tensor(META["std"]).view(1, -1, 1, 1)


@pytest.mark.slow
def test_plain_student_pt_loads_into_build_model(plain: tuple[Path, nn.Module]) -> None:
    out, net = plain
    fresh = build_model("resnet8", len(CLASSES))
    fresh.load_state_dict(torch.load(out / "student.pt", weights_only=True))  # strict: every key, no prefix
    x = _images()
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(_normalised(x)), net(_normalised(x)), atol=1e-5)
    record = json.loads((out / "student.json").read_text())
    assert record["arch"] == {"kind": "backbone", "backbone": "resnet8", "num_classes": 3, "in_chans": 3}


@pytest.mark.slow
def test_kd3_student_rebuilds_from_its_arch(kd3: tuple[Path, KD3Student]) -> None:
    out, student = kd3
    weights = torch.load(out / "student.pt", weights_only=True)
    assert not any(k.startswith(("head.", "student.")) for k in weights)  # no training head, no wrapper prefix
    assert {k.split(".")[0] for k in weights} == {"backbone", "projector", "classifier"}
    model, record = load_student(out)
    assert record["arch"]["kind"] == "kd3" and record["arch"]["teacher_hw"] == 8
    x = _images()
    script, _ = load_exported(out)
    with torch.no_grad():
        want = student.eval()(_normalised(x))
        assert torch.allclose(model(x), want, atol=1e-5)
        assert torch.allclose(script(x), want, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "kd3"])
def test_onnx_and_torch_export_reproduce_the_student(kind: str, request: pytest.FixtureRequest) -> None:
    onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed")
    onnxruntime = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    out, _ = request.getfixturevalue(kind)
    model, record = load_student(out)
    assert set(record["formats"]) == {"torchscript", "torch_export", "onnx"}
    assert all("sha256" in f for f in record["formats"].values()), record["formats"]
    x = _images(5)  # another batch size than the export's example: the batch axis is dynamic
    with torch.no_grad():
        want = model(x)
    session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(out / "student.onnx")).metadata_props}
    assert json.loads(meta["kd3.json"])["classes"] == CLASSES
    extra = {"kd3.json": ""}
    program = torch.export.load(out / "student.pt2", extra_files=extra)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), want, atol=1e-4)
    assert json.loads(extra["kd3.json"])["input_size"] == 32


@pytest.mark.slow
def test_model_card_says_what_goes_in_and_comes_out(kd3: tuple[Path, KD3Student]) -> None:
    out, _ = kd3
    card = (out / "model_card.md").read_text()
    assert "T-shirt/top, Trouser, Bag" in card and "(B, 3, 32, 32)" in card
    assert "mean [0.5, 0.4, 0.3]" in card and "ab" * 32 in card
    assert "training images: 86" in card and "Validation accuracy at export: 0.75" in card
    assert "| torchscript | student.ts | ok" in card and "| torch_export | student.pt2 | ok" in card


@pytest.mark.slow
def test_load_student_refuses_changed_weights(kd3: tuple[Path, KD3Student], tmp_path: Path) -> None:
    out, _ = kd3
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "student.pt").write_bytes((copy / "student.pt").read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"student\.pt: does not match .*student\.json"):
        load_student(copy)
    record = json.loads((copy / "student.json").read_text())
    del record["arch"]  # a record written before the arch was recorded
    (copy / "student.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"student\.json: no 'arch' \(exported by an older kd3\); rerun kd3 distill"):
        load_student(copy)


MISSING = "onnx, onnxruntime, onnxscript"


@pytest.mark.slow
def test_without_onnx_the_export_skips_it_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "student.onnx").write_bytes(b"an earlier run's graph")
    for name in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)  # what Python does for a package that is not installed
    caplog.set_level(logging.INFO, "distill.export")
    record = export_student(build_model("resnet8", len(CLASSES)), tmp_path, META)
    assert record["formats"]["onnx"] == {"skipped": f"not installed: {MISSING} (pip install 'kd3[onnx]')"}
    lines = [r.getMessage() for r in caplog.records if "ONNX" in r.getMessage()]
    assert lines == [f"ONNX export skipped: {MISSING} not installed (pip install 'kd3[onnx]')"]
    assert not (tmp_path / "student.onnx").exists()  # no stale file beside a record that disowns it
    assert "sha256" in record["formats"]["torch_export"]


class Gated(nn.Module):
    """A student torch.export cannot capture: its forward branches on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean((2, 3))
        if bool(z.amax() >= -100.0):  # always true for images, but data-dependent
            z = z * 2
        return self.fc(z)


@pytest.mark.slow
def test_an_exporter_failing_is_recorded_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "distill.export")
    record = export_student(Gated(), tmp_path, {**META, "student": "gated", "input_size": 8})
    assert record["formats"]["torch_export"]["failed"].startswith("GuardOnDataDependentSymNode")
    assert "failed" in record["formats"]["onnx"]
    assert "sha256" in record["formats"]["torchscript"]  # the format evaluate runs still exists
    assert json.loads((tmp_path / "student.json").read_text())["formats"] == record["formats"]
    assert not (tmp_path / "student.pt2").exists() and not (tmp_path / "student.onnx").exists()
    assert any("torch.export export failed for gated" in r.getMessage() for r in caplog.records)
    assert "| torch_export | - | GuardOnDataDependentSymNode" in (tmp_path / "model_card.md").read_text()
