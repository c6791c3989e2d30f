"""Stage ``world``: build the offline demo web (``crawl.world``) from Fashion-MNIST.

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
from crawl.world import RenderParams, WorldMix, build_world, load_fashion_mnist
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
    r = cfg.render
    render = RenderParams(
        min_size=r.min_size,
        max_size=r.max_size,
        nonsquare_prob=r.nonsquare_prob,
        max_aspect=r.max_aspect,
        tint_prob=r.tint_prob,
        light_bg_prob=r.light_bg_prob,
        dark_bg_prob=r.dark_bg_prob,
        bg_min_level=r.bg_min_level,
        dark_bg_max=r.dark_bg_max,
        object_scale=(r.object_scale[0], r.object_scale[1]),
        max_shift=r.max_shift,
        max_rotation_deg=r.max_rotation_deg,
        blur_prob=r.blur_prob,
        max_blur=r.max_blur,
        noise_std=r.noise_std,
        formats=dict(r.formats),
        jpeg_quality=(r.jpeg_quality[0], r.jpeg_quality[1]),
    )
    m = cfg.mix
    summary = build_world(
        images[cfg.first : cfg.last],
        labels[cfg.first : cfg.last],
        classes,
        out,
        seed=cfg.seed,
        results_per_class=cfg.results_per_class,
        mix=WorldMix(m.correct, m.wrong, m.junk, m.near_dup, m.broken),
        render=render,
        broken_kinds=tuple(cfg.broken_kinds),
        raw_offset=cfg.first,
    )
    log.info("world: %s", summary)
    return summary
