"""Fashion-MNIST, the demo's data: Debian's ``dataset-fashion-mnist`` idx files, and the demo
teacher's 32x32 RGB view of them. A real user's pipeline never reads these."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(source: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) from the idx files in ``source``.

    Debian's ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``.
    """
    src = Path(source)
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
            if (src / name).is_file():
                found[kind] = src / name
                break
        else:
            raise FileNotFoundError(
                f"{src}: no {prefix}-{kind}(.gz). Install Debian's dataset-fashion-mnist "
                f"(apt-get install dataset-fashion-mnist) or point world.source at the idx files."
            )
    images = _read_idx(found["images-idx3-ubyte"])
    labels = _read_idx(found["labels-idx1-ubyte"])
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{src}: idx files are inconsistent ({images.shape} images, {labels.shape} labels)")
    return images, labels


def fashion_mnist_rgb32(images: np.ndarray) -> np.ndarray:
    """The demo teacher's input distribution: 28x28 grey padded with 2 black pixels, replicated to RGB.

    (N, 28, 28) uint8 -> (N, 32, 32, 3) uint8.
    """
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=3)
