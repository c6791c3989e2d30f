"""Labelled sets of the teacher's original distribution: the validation curve (distill) and the test (evaluate).

A set is an image folder with one sub-folder per class name (matched ignoring case and spacing,
``/`` in a class name written ``_``: ``T-shirt_top``), or in the demo a slice of the Fashion-MNIST
test split rendered as the demo teacher's training data. Not a stage: the distill and evaluate
stages both read sets through here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from crawl.classes import normalise

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def _folder_key(name: str) -> str:
    """Folder names match class names after normalisation, with ``/`` written as ``_``."""
    return normalise(name.replace("/", "_").replace("\\", "_"))


def load_image_folder(folder: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, size, size, 3) uint8, labels, and the number of unreadable files skipped."""
    from crawl.images import ImageRejected, decode_image, resize_square  # only here: imagehash comes with it

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: labelled image folder not found")
    by_key = {_folder_key(c): k for k, c in enumerate(classes)}
    images, labels, skipped = [], [], 0
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in subdirs if _folder_key(p.name) not in by_key]
    if unknown:
        raise ValueError(f"{folder}: sub-folders not in the class list: {', '.join(unknown[:5])}")
    for sub in subdirs:
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                images.append(resize_square(decode_image(f.read_bytes()).image, size, "crop"))
                labels.append(by_key[_folder_key(sub.name)])
            except ImageRejected as e:
                log.warning("skipped %s (%s)", f, e.reason)
                skipped += 1
    if not images:
        raise ValueError(f"{folder}: no readable images in class sub-folders")
    return np.stack(images), np.array(labels), skipped


def load_eval_set(
    eval_dir: str | None, fashion_mnist: str | None, first: int, last: int | None, classes: list[str], size: int
) -> tuple[np.ndarray, np.ndarray, str, int]:
    """A labelled set of the original distribution: (images, labels, description, skipped files)."""
    skipped = 0
    if eval_dir:
        images, labels, skipped = load_image_folder(Path(eval_dir), classes, size)
        source = eval_dir
    elif fashion_mnist:
        from demo.fashion_mnist import fashion_mnist_rgb32, load_fashion_mnist

        raw, labels = load_fashion_mnist(fashion_mnist, "test")
        images = fashion_mnist_rgb32(raw)
        source = "fashion-mnist test"
    else:
        raise ValueError("set eval_dir (an image folder by class) or fashion_mnist (demo) for a labelled set")
    return images[first:last], labels[first:last], source, skipped
