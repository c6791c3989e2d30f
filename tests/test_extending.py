"""The examples in docs/extending.md work as written: each code block is run, and the engine, the
model and the method it registers are used the way the page says."""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from crawl.classes import parse_classes
from crawl.download import Fetcher, HttpLimits
from crawl.sources import SOURCES, SearchContext, make_source
from distill import methods as method_registry
from distill.models import MODELS, build_model
from distill.teacher import Teacher
from pipeline.config import DistillConfig, load_section

from conftest import REPO, HostileServer, respond

PAGE = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE, re.S)


def run_block(index: int) -> types.ModuleType:
    module = types.ModuleType(f"extending_example_{index}")
    sys.modules[module.__name__] = module  # dataclasses and type hints look their module up
    exec(compile(BLOCKS[index], f"docs/extending.md[{index}]", "exec"), module.__dict__)
    return module


@pytest.fixture
def registered() -> Iterator[dict[str, types.ModuleType]]:
    """Run the three examples; unregister what they added afterwards."""
    assert len(BLOCKS) == 3, "docs/extending.md should hold three python examples"
    try:
        yield {"engine": run_block(0), "model": run_block(1), "method": run_block(2)}
    finally:
        SOURCES.pop("jsonapi", None)
        MODELS.pop("tinycnn", None)
        method_registry._REGISTRY.pop("kd_ce", None)
        for i in range(len(BLOCKS)):
            sys.modules.pop(f"extending_example_{i}", None)


def test_the_engine_example_pages_through_a_json_api(registered, hostile: HostileServer) -> None:  # type: ignore[no-untyped-def]
    engine = registered["engine"].JsonApiSource
    engine.base = hostile.base  # the example's API, served over loopback
    for offset in (0, 50):
        results = [{"url": f"http://img.example/{offset + i}.jpg"} for i in range(50 if offset == 0 else 3)]
        hostile.routes[f"/search?q=red+shoe&offset={offset}"] = respond(200, json.dumps({"results": results}).encode())
    hostile.routes["/search?q=red+shoe&offset=100"] = respond(200, b'{"results": []}')
    limits = HttpLimits(per_host_delay_s=0.0, retries=1, deadline_s=5.0)
    src = make_source("jsonapi", SearchContext(Fetcher(limits)))
    urls = src.search(parse_classes("shoe\n")[0], "red shoe", 60)
    assert len(urls) == 53 and urls[0] == "http://img.example/0.jpg" and urls[-1] == "http://img.example/52.jpg"


def test_the_model_example_is_a_kd3_backbone(registered) -> None:  # type: ignore[no-untyped-def]
    net = build_model("tinycnn", 4)
    x = torch.rand(2, 3, 32, 32)
    assert net.forward_features(x).shape == (2, 64, 8, 8) and net(x).shape == (2, 4)
    assert net.feature_dim == 64


def test_the_method_example_is_configured_by_params_and_trains(registered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    params = tmp_path / "params.yaml"
    params.write_text("distill:\n  method: kd_ce\n  kd_ce:\n    ce_weight: 0.3\n")
    cfg = load_section(params, "distill", DistillConfig)
    assert type(cfg.options).__name__ == "KDCEOptions" and cfg.options.ce_weight == 0.3
    params.write_text("distill:\n  method: kd_ce\n  kd_ce:\n    ce_weight: -1\n")
    with pytest.raises(ValueError, match=r"distill.kd_ce.ce_weight: -1.0 is out of range"):
        load_section(params, "distill", DistillConfig)
    teacher = Teacher(build_model("resnet8", 4), [0.5] * 3, [0.25] * 3)
    method = method_registry.build_method(
        "kd_ce", teacher, build_model("tinycnn", 4), cfg.options, num_classes=4, input_size=32, in_chans=3
    )
    out = method(torch.rand(4, 3, 32, 32))
    assert set(out) == {"loss", "kd", "ce"} and torch.allclose(out["loss"], out["kd"] + 0.3 * out["ce"])
    out["loss"].backward()
    assert all(p.grad is not None for p in method.student.parameters())
