"""``kd3 predict``: a real exported student on real image files, unreadable files skipped and counted."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from demo.fashion_mnist import fashion_mnist_rgb32
from distill.export import export_student, load_student
from distill.label import predict
from distill.models import build_model
from distill.supervised import train_classifier
from pipeline.cli import app
from pipeline.evalset import load_image_folder

from conftest import TINY_CLASSES, synthetic_items

runner = CliRunner()
MEAN, STD = [0.2860] * 3, [0.3530] * 3


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet8 trained for a few steps on synthetic items, exported as kd3 distill exports it."""
    images, labels = synthetic_items(24, 3)
    pool = fashion_mnist_rgb32(images)
    torch.manual_seed(0)
    net = build_model("resnet8", 3)
    kw = {"input_size": 32, "batch_size": 24, "lr": 0.05, "weight_decay": 0.0, "seed": 0}
    train_classifier(net, pool, labels, mean=MEAN, std=STD, epochs=2, device=torch.device("cpu"), **kw)
    out = tmp_path_factory.mktemp("student")
    meta = {"method": "kd", "student": "resnet8", "classes": TINY_CLASSES, "input_size": 32, "in_chans": 3}
    export_student(net, out, {**meta, "mean": MEAN, "std": STD, "teacher_sha256": "0" * 64})
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of PNG and JPEG files at other sizes than the student's, plus files that are not images."""
    root = tmp_path_factory.mktemp("photos")
    images, labels = synthetic_items(3, 3, seed=5)
    for i, (im, k) in enumerate(zip(images, labels, strict=True)):
        folder = root / TINY_CLASSES[k].replace("/", "_")
        folder.mkdir(exist_ok=True)
        rgb = Image.fromarray(im).convert("RGB").resize((40 + 4 * i, 56))
        rgb.save(folder / f"{i}.png") if i % 2 else rgb.save(folder / f"{i}.jpg", quality=95)
    (root / "Bag" / "nested").mkdir()
    Image.fromarray(images[0]).save(root / "Bag" / "nested" / "deep.png")
    (root / "Bag" / "noise.jpg").write_bytes(b"this is not a JPEG at all")
    good = io.BytesIO()
    Image.fromarray(images[1]).convert("RGB").resize((64, 64)).save(good, "PNG")
    (root / "Trouser" / "cut.png").write_bytes(good.getvalue()[:200])  # truncated mid-stream
    (root / "Trouser" / "empty.png").write_bytes(b"")
    with open(root / "Trouser" / "huge.jpg", "wb") as f:  # sparse: over the 20 MB cap without using the disk
        f.truncate(20_000_001)
    (root / "notes.txt").write_text("not an image, not counted")
    return root


def _rows(output: str) -> list[list[str]]:
    return [line.split("\t") for line in output.splitlines() if "\t" in line]


@pytest.mark.slow
def test_folder_prints_path_class_confidence_and_counts_skips(student: Path, photos: Path) -> None:
    result = runner.invoke(app, ["predict", str(photos), "--student", str(student), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    paths = [Path(r[0]) for r in rows]
    assert len(rows) == 10 and photos / "Bag" / "nested" / "deep.png" in paths  # 9 + the nested one
    for r in rows:
        assert len(r) == 5 and r[1] in TINY_CLASSES and r[3] in TINY_CLASSES and r[1] != r[3]
        assert 1 >= float(r[2]) >= float(r[4]) >= 0
    err = result.stderr
    assert f"skipped {photos / 'Bag' / 'noise.jpg'}: unidentified" in err
    assert f"skipped {photos / 'Trouser' / 'empty.png'}: empty" in err
    assert f"skipped {photos / 'Trouser' / 'cut.png'}: truncated (" in err and "(truncated:" not in err
    assert f"skipped {photos / 'Trouser' / 'huge.jpg'}: too_large (20000001 bytes)" in err
    assert "predict: 10 images, 4 skipped (" in err and "notes.txt" not in result.output


@pytest.mark.slow
def test_predictions_match_how_evaluate_scores_a_folder(student: Path, photos: Path, tmp_path: Path) -> None:
    clean = tmp_path / "eval"  # evaluate's folder reader refuses damaged files: give it only the good ones
    for f in photos.glob("*/*"):
        if f.suffix in {".png", ".jpg"} and f.name not in {"noise.jpg", "cut.png", "empty.png", "huge.jpg"}:
            (clean / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, clean / f.parent.name / f.name)
    model, record = load_student(student)
    images, _, skipped = load_image_folder(clean, TINY_CLASSES, 32)
    logits = predict(model, images, input_size=32, in_chans=3, batch_size=4, device=torch.device("cpu"))
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    result = runner.invoke(app, ["predict", str(clean), "--student", str(student), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    order = sorted(clean.glob("*/*"))  # load_image_folder's order: class folders sorted, files sorted
    assert [Path(r[0]) for r in rows] == order and skipped == 0
    assert [r[1] for r in rows] == [TINY_CLASSES[k] for k in probs.argmax(1)]
    np.testing.assert_allclose([float(r[2]) for r in rows], probs.max(1), atol=1e-4)


@pytest.mark.slow
def test_csv_out_and_a_single_file(student: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(photos), "--student", str(student), "--top-k", "9", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _rows(result.stdout) == [] and f"wrote {out}" in result.stderr
    rows = list(csv.reader(out.read_text().splitlines()))
    assert rows[0] == ["path", "class", "confidence", "class_2", "confidence_2", "class_3", "confidence_3"]
    assert len(rows) == 11 and abs(sum(float(x) for x in rows[1][2::2]) - 1) < 1e-3  # top-9 of 3 classes: all
    assert not list(tmp_path.glob(".predictions*"))  # no temporary left beside it
    one = photos / "Trouser" / sorted(p.name for p in (photos / "Trouser").glob("*.jpg"))[0]
    result = runner.invoke(app, ["predict", str(one), "--student", str(student)])
    assert result.exit_code == 0, result.output
    (row,) = _rows(result.stdout)
    assert Path(row[0]) == one and len(row) == 3
    assert row[1:] == next(r for r in rows[1:] if Path(r[0]) == one)[1:3]


def test_missing_path_or_student_is_a_clear_error(photos: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere: no such file or folder" in result.output
    result = runner.invoke(app, ["predict", str(photos), "--student", str(tmp_path / "none")])
    assert result.exit_code == 1 and "student.json: no exported student (run kd3 distill first)" in result.output
    result = runner.invoke(app, ["predict", str(photos), "--top-k", "0"])
    assert result.exit_code == 2 and "--top-k" in result.output
