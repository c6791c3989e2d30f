"""The trainer's CUDA-specific code paths, exercised on the CPU: generator hygiene, pool upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill.data import ImagePool
from distill.losses import mix_distribution


def test_mix_distribution_seeds_no_global_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded mix must not reseed the CUDA generators (``torch.manual_seed`` does, and nothing
    restores them): every step would reset the state dropout and other CUDA draws read."""
    seeded: list[int] = []
    real = torch.cuda.manual_seed_all

    def spy(seed: int) -> Any:
        seeded.append(seed)
        return real(seed)

    monkeypatch.setattr(torch.cuda, "manual_seed_all", spy)
    x = torch.randn(8, 3, 16, 16)
    before = torch.get_rng_state()
    a = mix_distribution(x, torch.Generator().manual_seed(3))
    b = mix_distribution(x, torch.Generator().manual_seed(3))
    assert seeded == [] and torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_a_read_only_memmap_uploads_without_a_warning(tmp_path: Path) -> None:
    """pyproject makes warnings errors: a read-only memmap handed to torch as it is warns."""
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    pool = ImagePool(mm, torch.device("cpu"), resident=True)  # the CUDA upload path, onto the CPU
    assert pool.resident and pool.data is not None and torch.equal(pool.data, torch.from_numpy(images))
    frozen = images.copy()
    frozen.flags.writeable = False
    pool = ImagePool(frozen, torch.device("cpu"))
    assert pool.data is not None and torch.equal(pool.data, torch.from_numpy(images))
