"""Stage ``world``: build the offline demo web (``demo.world``) from Fashion-MNIST.

Reads ``world:`` and ``crawl.engines``. When no crawl engine is ``mirror`` (real use), the stage
does no demo work: it reads no Fashion-MNIST and writes only a marker index, so ``dvc repro`` on a
user's params never needs the demo data.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from crawl.classes import read_classes
from demo.fashion_mnist import load_fashion_mnist
from demo.world import build_world
from pipeline.config import CrawlConfig, WorldConfig

log = logging.getLogger(__name__)


def run(cfg: WorldConfig, crawl_cfg: CrawlConfig) -> dict[str, object]:
    out = Path(cfg.out_dir)
    if "mirror" not in crawl_cfg.engines:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        marker = {"version": 1, "disabled": "no crawl engine is 'mirror': the demo world is not needed"}
        (out / "index.json").write_text(json.dumps(marker) + "\n")
        log.info("world: skipped (%s)", marker["disabled"])
        return marker
    classes = [c.name for c in read_classes(cfg.classes)]
    images, labels = load_fashion_mnist(cfg.source, "train")
    if cfg.last > len(images):
        raise ValueError(f"world.last={cfg.last} but {cfg.source} has only {len(images)} training images")
    if int(labels.max()) + 1 != len(classes):
        raise ValueError(f"{cfg.classes}: {len(classes)} classes, but the data has {int(labels.max()) + 1} labels")
    summary = build_world(
        images[cfg.first : cfg.last],
        labels[cfg.first : cfg.last],
        classes,
        out,
        seed=cfg.seed,
        results_per_class=cfg.results_per_class,
        mix=cfg.mix,
        render=cfg.render,
        broken_kinds=tuple(cfg.broken_kinds),
        raw_offset=cfg.first,
    )
    log.info("world: %s", summary)
    return summary
