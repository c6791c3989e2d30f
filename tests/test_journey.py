"""The user's own journey, end to end: a torchvision teacher of theirs, their class file and a URL list
served over loopback, then ``dvc repro`` through evaluate in a fresh copy of the repository.

No demo data is involved: the world stage only writes its marker, Fashion-MNIST is never read.
"""

from __future__ import annotations

import functools
import http.server
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image, ImageDraw

from distill.supervised import train_classifier
from pipeline.artifacts.student import ExportedStudent

from conftest import copy_repo, git_commit_all, run_in

pytestmark = pytest.mark.slow

CLASSES = ["red circle", "green square", "blue bar", "yellow ring"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def draw(k: int, rng: np.random.Generator) -> Image.Image:
    """One web-ish photo of class ``k``: a coloured shape, jittered, on a noisy background."""
    side = int(rng.integers(72, 120))
    bg = rng.integers(0, 90, size=(side, side, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    colour = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40)][k]
    colour = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in colour)
    r = side * rng.uniform(0.2, 0.35)
    cx, cy = side / 2 + rng.uniform(-0.1, 0.1) * side, side / 2 + rng.uniform(-0.1, 0.1) * side
    box = (cx - r, cy - r, cx + r, cy + r)
    if k == 0:
        d.ellipse(box, fill=colour)
    elif k == 1:
        d.rectangle(box, fill=colour)
    elif k == 2:
        d.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
    else:
        d.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    return img


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A folder of images per class, served over loopback HTTP; yields (folder, base URL)."""
    root = tmp_path_factory.mktemp("web")
    rng = np.random.default_rng(0)
    for k in range(len(CLASSES)):
        for i in range(24):
            draw(k, rng).save(root / f"c{k}_{i}.{'png' if i % 3 else 'jpg'}")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def teacher_checkpoint(arch: str, path: Path) -> None:
    """The user's teacher: a torchvision model trained briefly at 64 px, saved as a plain state dict."""
    rng = np.random.default_rng(1)
    x = np.stack([np.asarray(draw(k, rng).resize((64, 64))) for k in range(len(CLASSES)) for _ in range(40)])
    y = np.repeat(np.arange(len(CLASSES)), 40)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(CLASSES))
    train_classifier(
        model,
        x,
        y,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=64,
        epochs=3,
        batch_size=32,
        lr=0.05,
        weight_decay=0.0,
        seed=0,
        device=torch.device("cpu"),
    )
    torch.save(model.state_dict(), path)  # exactly what a torchvision user saves


@pytest.mark.parametrize(
    ("arch", "method", "labelled"), [("resnet18", "kd3", True), ("mobilenet_v3_small", "kd", False)]
)
def test_own_torchvision_teacher_classes_and_url_list_through_dvc_repro(
    web: tuple[Path, str], tmp_path: Path, arch: str, method: str, labelled: bool
) -> None:
    folder, base = web
    repo = copy_repo(tmp_path / "repo")
    mine = repo / "mine"
    mine.mkdir()
    (mine / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (mine / "urls.tsv").write_text(
        "".join(f"{CLASSES[int(p.name[1])]}\t{base}/{p.name}\n" for p in sorted(folder.iterdir()))
    )
    teacher_checkpoint(arch, mine / "teacher.pt")
    if labelled:  # a few labelled images of the teacher's distribution, one folder per class
        rng = np.random.default_rng(7)
        for k, name in enumerate(CLASSES):
            (mine / "eval" / name).mkdir(parents=True)
            for i in range(5):
                draw(k, rng).save(mine / "eval" / name / f"{i}.png")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["crawl"].update(
        classes="mine/classes.txt",
        engines=["urls"],
        urls_file="mine/urls.tsv",
        per_class=24,
        min_per_class=10,
        progress=False,
    )
    params["crawl"]["http"].update(allow_private=True, per_host_delay_s=0.0, per_host_concurrency=4)
    params["clean"].update(image_size=None, min_side=32, progress=False)
    params["teacher"].update(
        checkpoint="mine/teacher.pt",
        arch=f"torchvision/{arch}",
        classes="mine/classes.txt",
        input_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    params["label"]["truth"] = None
    params["distill"].update(
        method=method,
        student="resnet8",
        epochs=1,
        batch_size=16,
        truth=None,
        eval={"eval_dir": "mine/eval" if labelled else None, "fashion_mnist": None, "last": None},
    )
    params["evaluate"].update(eval_dir="mine/eval" if labelled else None, fashion_mnist=None, first=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit_all(repo)

    started = time.time()
    result = run_in(["dvc", "repro", "evaluate"], repo, timeout=900)
    seconds = time.time() - started
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    print(f"journey ({arch}, {method}): dvc repro through evaluate in {seconds:.0f} s", file=sys.stderr)

    crawl = json.loads((repo / "data/crawl/report.json").read_text())
    assert [c["downloaded"] for c in crawl["classes"]] == [24] * 4
    images = np.load(repo / "data/clean/images.npy", mmap_mode="r")
    assert images.shape[1:] == (96, 96, 3)  # the teacher's 64 px plus the crops' margin
    label = json.loads((repo / "data/label/report.json").read_text())
    assert [c["class"] for c in label["transfer"]["per_class"]] == CLASSES
    student = json.loads((repo / "metrics/student.json").read_text())
    assert 0.0 <= student["agreement_heldout_web"] <= 1.0
    teacher_metrics = json.loads((repo / "metrics/teacher.json").read_text())
    assert ("teacher_accuracy" in teacher_metrics) == labelled and ("student_accuracy" in student) == labelled

    exported = ExportedStudent.load(repo / "data/distill")
    model = exported.load_model()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 4) and exported.classes == CLASSES

    # DVC tracks the user's own files: an edited URL list makes the crawl stage out of date
    with open(mine / "urls.tsv", "a") as f:
        f.write(f"{CLASSES[0]}\t{base}/c0_0.png?again\n")
    status = run_in(["dvc", "status", "crawl"], repo)
    assert "mine/urls.tsv" in status.stdout, status.stdout
