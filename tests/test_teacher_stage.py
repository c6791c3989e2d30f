"""Teacher, label and evaluate stages: the demo teacher, and swapping in a user's checkpoint."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from distill.models import build_model
from pipeline import teacher_stage
from pipeline.cli import app
from pipeline.config import DemoTeacherConfig, TeacherConfig

from conftest import TINY_CLASSES, synthetic_items, write_idx

runner = CliRunner()


def test_demo_teacher_trains_once_then_is_reused(tmp_path: Path) -> None:
    images, labels = synthetic_items(20, 3)
    write_idx(tmp_path / "fm", images, labels)
    (tmp_path / "classes.txt").write_text("\n".join(TINY_CLASSES))
    demo = DemoTeacherConfig(source=str(tmp_path / "fm"), first=0, last=60, epochs=1, batch_size=32)
    cfg = TeacherConfig(classes=str(tmp_path / "classes.txt"), out_dir=str(tmp_path / "t"), demo=demo, device="cpu")
    record = teacher_stage.run(cfg)
    assert record.format == "state_dict" and record.classes == TINY_CLASSES
    assert record.demo["settings"]["last"] == 60 and len(record.demo["history"]) == 1
    first = (tmp_path / "t" / "teacher.json").read_bytes()
    mtime = (tmp_path / "t" / "teacher.pt").stat().st_mtime_ns
    teacher_stage.run(cfg)
    assert (tmp_path / "t" / "teacher.json").read_bytes() == first  # nothing downstream re-runs
    assert (tmp_path / "t" / "teacher.pt").stat().st_mtime_ns == mtime  # not retrained


def save_user_checkpoint(path: Path, kind: str, num_classes: int) -> None:
    torch.manual_seed(1)
    model = build_model("resnet8", num_classes).eval()
    if kind == "state_dict":
        torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 9}, path)
    elif kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.trace(model, torch.rand(1, 3, 32, 32)).save(str(path))
    else:  # safetensors
        header, blobs, offset = {}, [], 0
        for k, v in model.state_dict().items():
            raw = v.float().contiguous().numpy().tobytes()
            header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
            blobs.append(raw)
            offset += len(raw)
        h = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture()
def project(tmp_path: Path, tiny_world: Path) -> Path:
    """A crawled and cleaned tiny world plus an evaluation folder, wired up in a params file."""
    from demo.mirror import MirrorServer

    (tmp_path / "classes.txt").write_text("\n".join(TINY_CLASSES) + "\n")
    evald = tmp_path / "eval"
    for k, name in enumerate(TINY_CLASSES):
        d = evald / name.replace("/", "_")
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (40 * k, 20 * i, 100)).save(d / f"{i}.png")
    (evald / "T-shirt_top").rename(evald / "t-shirt_top")  # matched ignoring case; "/" is written "_"
    with MirrorServer(tiny_world) as server:
        port = server.server_address[1]
    (tmp_path / "params.yaml").write_text(f"""
crawl: {{classes: {tmp_path}/classes.txt, out_dir: {tmp_path}/crawl, per_class: 20, min_per_class: 1, progress: false,
         http: {{per_host_delay_s: 0.0, per_host_concurrency: 4}}, mirror: {{world_dir: {tiny_world}, port: {port}}}}}
clean: {{crawl_dir: {tmp_path}/crawl, out_dir: {tmp_path}/clean, image_size: 32, min_side: 16, progress: false}}
teacher: {{checkpoint: null, classes: {tmp_path}/classes.txt, out_dir: {tmp_path}/teacher, device: cpu}}
label: {{clean_dir: {tmp_path}/clean, teacher_dir: {tmp_path}/teacher, out_dir: {tmp_path}/label, device: cpu,
         truth: {tiny_world}/truth.jsonl}}
evaluate: {{teacher_dir: {tmp_path}/teacher, eval_dir: {evald}, out_dir: {tmp_path}/metrics, device: cpu}}
""")
    params = str(tmp_path / "params.yaml")
    for cmd in ("crawl", "clean"):
        result = runner.invoke(app, [cmd, "--params", params])
        assert result.exit_code == 0, result.output
    return tmp_path


def test_eval_folder_with_an_unknown_class_is_an_error(project: Path) -> None:
    ckpt = project / "user.pt"
    save_user_checkpoint(ckpt, "state_dict", 3)
    params = str(project / "params.yaml")
    assert runner.invoke(app, ["teacher", "--params", params, "--checkpoint", str(ckpt)]).exit_code == 0
    (project / "eval" / "Hat").mkdir()
    result = runner.invoke(app, ["evaluate", "--params", params])
    assert result.exit_code == 1 and "sub-folders not in the class list: Hat" in result.output


@pytest.mark.parametrize(
    ("kind", "suffix"), [("state_dict", ".pt"), ("torchscript", ".pt"), ("safetensors", ".safetensors")]
)
def test_swap_in_a_user_checkpoint_then_label_and_evaluate(project: Path, kind: str, suffix: str) -> None:
    ckpt = project / f"user{suffix}"
    save_user_checkpoint(ckpt, kind, 3)
    p = project / "params.yaml"
    if kind == "torchscript":
        p.write_text(
            p.read_text().replace("teacher: {checkpoint: null,", "teacher: {checkpoint: null, format: torchscript,")
        )
    params = str(p)
    result = runner.invoke(app, ["teacher", "--params", params, "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.output
    record = json.loads((project / "teacher" / "teacher.json").read_text())
    assert (
        record["checkpoint"] == str(ckpt)
        and "demo" not in record
        and record["format"] == kind.replace("safetensors", "state_dict")
    )
    result = runner.invoke(app, ["label", "--params", params])
    assert result.exit_code == 0, result.output
    logits = np.load(project / "label" / "logits.npy")
    kept = (project / "clean" / "kept.jsonl").read_text().splitlines()
    assert logits.shape == (len(kept), 3) and logits.dtype == np.float16
    report = json.loads((project / "label" / "report.json").read_text())
    assert sum(report["per_class"].values()) == len(kept) and 0 <= report["demo_truth"]["in_class_accuracy"] <= 1
    assert (project / "label" / "confidence.png").is_file()
    result = runner.invoke(app, ["evaluate", "--params", params])
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "metrics" / "teacher.json").read_text())
    details = json.loads((project / "metrics" / "teacher_details.json").read_text())
    assert metrics["eval_images"] == 9 and set(details["teacher_per_class"]) == set(TINY_CLASSES)
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # dvc metrics: numbers only
    rows = (project / "metrics" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "image,actual,teacher" and len(rows) == 1 + 9  # no student_dir: the teacher's column only


def test_a_bad_checkpoint_fails_the_teacher_stage_by_name(project: Path) -> None:
    ckpt = project / "user.pt"
    save_user_checkpoint(ckpt, "state_dict", 5)  # 5 outputs, 3 classes
    result = runner.invoke(app, ["teacher", "--params", str(project / "params.yaml"), "--checkpoint", str(ckpt)])
    assert result.exit_code == 1
    assert f"{ckpt}: the teacher has 5 outputs but the class list has 3 classes" in result.output


def test_label_refuses_a_checkpoint_changed_after_the_teacher_stage(project: Path) -> None:
    ckpt = project / "user.pt"
    save_user_checkpoint(ckpt, "state_dict", 3)
    params = str(project / "params.yaml")
    assert runner.invoke(app, ["teacher", "--params", params, "--checkpoint", str(ckpt)]).exit_code == 0
    torch.save(build_model("resnet8", 3).state_dict(), ckpt)  # swapped behind the record's back
    result = runner.invoke(app, ["label", "--params", params])
    assert result.exit_code == 1 and "changed since the teacher stage ran" in result.output


def _teacher_with_params(project: Path, classes: list[str], **teacher: object) -> str:
    """Point params.yaml's teacher at its own class file (in ``classes`` order) and extra keys."""
    (project / "teacher_classes.txt").write_text("\n".join(classes) + "\n")
    p = project / "params.yaml"
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in teacher.items())
    p.write_text(
        p.read_text().replace(
            f"teacher: {{checkpoint: null, classes: {project}/classes.txt,",
            f"teacher: {{checkpoint: null, classes: {project}/teacher_classes.txt{extra},",
        )
    )
    return str(p)


def test_teacher_classes_in_another_order_are_matched_by_name(project: Path) -> None:
    ckpt = project / "user.pt"
    save_user_checkpoint(ckpt, "state_dict", 3)
    params = _teacher_with_params(project, TINY_CLASSES[::-1])
    assert runner.invoke(app, ["teacher", "--params", params, "--checkpoint", str(ckpt)]).exit_code == 0
    result = runner.invoke(app, ["label", "--params", params])
    assert result.exit_code == 0, result.output
    report = json.loads((project / "label" / "report.json").read_text())
    kept = [json.loads(line) for line in (project / "clean" / "kept.jsonl").read_text().splitlines()]
    for row in report["transfer"]["per_class"]:  # crawled counts follow the names, not the positions
        assert row["crawled"] == sum(k["class_name"] == row["class"] and len(k["classes"]) == 1 for k in kept)
    assert [r["class"] for r in report["transfer"]["per_class"]] == TINY_CLASSES[::-1]


def test_teacher_classes_that_differ_from_the_crawls_are_named(project: Path) -> None:
    ckpt = project / "user.pt"
    save_user_checkpoint(ckpt, "state_dict", 3)
    params = _teacher_with_params(project, ["T-shirt/top", "Trouser", "Hat"])
    assert runner.invoke(app, ["teacher", "--params", params, "--checkpoint", str(ckpt)]).exit_code == 0
    result = runner.invoke(app, ["label", "--params", params])
    assert result.exit_code == 1
    assert "only in the teacher" in result.output and "'Hat'" in result.output and "'Bag'" in result.output


def test_a_collapsed_teacher_warns_and_strict_makes_it_fail(project: Path) -> None:
    torch.manual_seed(1)
    model = build_model("resnet8", 3).eval()
    with torch.no_grad():
        model.classifier.bias[:] = torch.tensor([50.0, 0.0, 0.0])  # calls everything the first class
    ckpt = project / "collapsed.pt"
    torch.save(model.state_dict(), ckpt)
    params = _teacher_with_params(project, TINY_CLASSES)
    assert runner.invoke(app, ["teacher", "--params", params, "--checkpoint", str(ckpt)]).exit_code == 0
    result = runner.invoke(app, ["label", "--params", params])
    assert result.exit_code == 0, result.output
    assert "warning [collapse]" in result.output and "'T-shirt/top'" in result.output
    assert "warning [near_chance]" in result.output
    p = Path(params)
    p.write_text(p.read_text().replace("label: {", "label: {strict: true, "))
    result = runner.invoke(app, ["label", "--params", params])
    assert result.exit_code == 1 and "label.strict is on" in result.output and "collapse" in result.output


class _NaNOnLargeBatches(torch.nn.Module):
    """Finite on a few images (a probe), NaN on a full batch: only the label stage can see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.mean(dim=(2, 3))  # (B, 3)
        return logits + (torch.full_like(logits, float("nan")) if x.shape[0] > 16 else torch.zeros_like(logits))


def test_label_refuses_non_finite_teacher_output(project: Path) -> None:
    ckpt = project / "nan.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_NaNOnLargeBatches()).save(str(ckpt))
    params = _teacher_with_params(project, TINY_CLASSES, format="torchscript")
    result = runner.invoke(app, ["teacher", "--params", params, "--checkpoint", str(ckpt)])
    assert result.exit_code == 0, result.output
    kept = (project / "clean" / "kept.jsonl").read_text().splitlines()
    assert len(kept) > 16
    result = runner.invoke(app, ["label", "--params", params])
    assert result.exit_code == 1 and "non-finite logits" in result.output and str(ckpt) in result.output
    assert not (project / "label" / "logits.npy").exists()


@pytest.mark.slow
def test_sigterm_during_demo_teacher_training_exits_143_with_a_message(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    images, labels = synthetic_items(400, 3)
    write_idx(tmp_path / "fm", images, labels)
    (tmp_path / "classes.txt").write_text("\n".join(TINY_CLASSES))
    (tmp_path / "params.yaml").write_text(f"""
teacher: {{classes: {tmp_path}/classes.txt, out_dir: {tmp_path}/t, device: cpu,
          demo: {{source: {tmp_path}/fm, first: 0, last: 1200, epochs: 200, batch_size: 32}}}}
""")
    cmd = [sys.executable, "-m", "pipeline.cli", "teacher", "--params", str(tmp_path / "params.yaml")]
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until training has started
            if "training the demo teacher" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 143, rest
    assert "terminated (SIGTERM)" in rest and not (tmp_path / "t" / "teacher.pt").exists()
