"""``kd3 init``: a params file for a user's own checkpoint, class file and URL list."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
import yaml
from typer.testing import CliRunner

from pipeline import config
from pipeline.cli import app

from conftest import REPO

runner = CliRunner()


def test_init_fills_what_a_torchvision_checkpoint_tells_and_says_what_it_assumed(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "teacher.pt")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    (tmp_path / "urls.tsv").write_text("cat\thttps://example.org/cat.jpg\n")
    out = tmp_path / "params.yaml"
    args = [
        "init",
        "--checkpoint",
        str(tmp_path / "teacher.pt"),
        "--classes",
        str(tmp_path / "classes.txt"),
        "--urls",
        str(tmp_path / "urls.tsv"),
        "--template",
        str(REPO / "params.yaml"),
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "filled   teacher.arch: torchvision/resnet18 (its keys and shapes)" in result.output
    assert "assumed  teacher.input_size: 224" in result.output and "set it   evaluate.eval_dir" in result.output
    p = yaml.safe_load(out.read_text())
    assert p["teacher"]["arch"] == "torchvision/resnet18" and p["teacher"]["mean"] == [0.485, 0.456, 0.406]
    assert p["crawl"]["engines"] == ["urls"] and p["label"]["truth"] is None and p["distill"]["truth"] is None
    assert p["evaluate"]["fashion_mnist"] is None and p["clean"]["image_size"] is None
    for section, cls in config.SECTIONS.items():  # every section is a valid config
        config.load_section(out, section, cls)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists; pass --force" in again.output


def test_init_says_what_it_could_not_infer(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(3, 5)}, tmp_path / "odd.pt")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    out = tmp_path / "p.yaml"
    result = runner.invoke(
        app,
        [
            "init",
            "--checkpoint",
            str(tmp_path / "odd.pt"),
            "--classes",
            str(tmp_path / "classes.txt"),
            "--engine",
            "bing",
            "--template",
            str(REPO / "params.yaml"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "set it   teacher.arch: no registry or torchvision architecture has exactly its keys" in result.output
    assert "set it   teacher.input_size" in result.output and "set it   teacher.mean/std" in result.output
    assert yaml.safe_load(out.read_text())["distill"]["method"] == "kd"
