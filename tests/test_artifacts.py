"""The artifacts stages hand each other: a damaged or mismatched output is refused, naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import ArtifactError, array_fingerprint, check_classes
from pipeline.artifacts.clean import CleanSet
from pipeline.artifacts.label import PseudoLabels
from pipeline.artifacts.teacher import TeacherRecord

CLASSES = ["cat", "dog"]


def make_clean(folder: Path, n: int = 6) -> CleanSet:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    np.save(folder / "images.npy", images)
    kept = [
        {
            "sha256": f"{i:064x}",
            "path": f"o/{i}.png",
            "class_name": CLASSES[i % 2],
            "class_index": i % 2,
            "classes": [CLASSES[i % 2]],
        }
        for i in range(n)
    ]
    CleanSet.save_index(folder, kept, {"kept": n}, CLASSES)
    return CleanSet.load(folder)


def record(sha: str = "a" * 64) -> TeacherRecord:
    return TeacherRecord(
        format="state_dict",
        arch="resnet8",
        classes=CLASSES,
        input_size=8,
        in_chans=3,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        checkpoint="t.pt",
        sha256=sha,
        bytes=1,
    )


def test_a_clean_set_round_trips_with_its_class_names_and_queries(tmp_path: Path) -> None:
    clean = make_clean(tmp_path / "clean")
    assert clean.classes == tuple(CLASSES) and len(clean.kept) == 6
    assert clean.query_classes(["dog", "cat"]).tolist() == [1, 0, 1, 0, 1, 0]  # by name, in the teacher's order


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "damaged packed image array"),
        (lambda p: p.write_bytes(b""), "damaged packed image array"),
        (lambda p: np.save(p, np.zeros((6, 8, 8, 3))), r"expected \(N, S, S, 3\) uint8"),
        (lambda p: np.save(p, np.zeros((5, 8, 8, 3), dtype=np.uint8)), "5 rows, kept.jsonl 6 lines"),
        (lambda p: np.save(p, np.zeros((6, 8, 8, 3), dtype=np.uint8)), "does not match the fingerprint"),
    ],
)
def test_a_damaged_packed_array_is_refused_naming_it(tmp_path: Path, damage: object, message: str) -> None:
    make_clean(tmp_path / "clean")
    damage(tmp_path / "clean" / "images.npy")  # type: ignore[operator]
    with pytest.raises(ArtifactError, match=message) as err:
        CleanSet.load(tmp_path / "clean")
    assert "images.npy" in str(err.value) or "clean" in str(err.value)


def test_pickled_arrays_are_never_loaded(tmp_path: Path) -> None:
    make_clean(tmp_path / "clean")
    np.save(tmp_path / "clean" / "images.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match="images.npy: damaged"):
        CleanSet.load(tmp_path / "clean")


def test_labels_must_come_from_this_teacher_and_this_clean_set(tmp_path: Path) -> None:
    clean = make_clean(tmp_path / "clean")
    logits = np.zeros((6, 2), dtype=np.float32)
    PseudoLabels.save(tmp_path / "label", logits, {"teacher_sha256": "a" * 64, "images_fingerprint": clean.fingerprint})
    assert PseudoLabels.load(tmp_path / "label", clean, record()).logits.shape == (6, 2)
    with pytest.raises(ArtifactError, match="labelled by another teacher"):
        PseudoLabels.load(tmp_path / "label", clean, record("b" * 64))
    other = make_clean(tmp_path / "other", n=6)
    np.save(other.dir / "images.npy", np.ones((6, 8, 8, 3), dtype=np.uint8))
    CleanSet.save_index(other.dir, [k.__dict__ for k in other.kept], {"kept": 6}, CLASSES)
    with pytest.raises(ArtifactError, match="labelled another clean set"):
        PseudoLabels.load(tmp_path / "label", CleanSet.load(other.dir), record())
    PseudoLabels.save(tmp_path / "label", np.full((6, 2), np.nan), {"teacher_sha256": "a" * 64})
    with pytest.raises(ArtifactError, match="non-finite logits"):
        PseudoLabels.load(tmp_path / "label", clean, record())


def test_a_kept_record_without_the_optional_keys_gets_their_defaults(tmp_path: Path) -> None:
    """A pool made outside the clean stage (the benchmark's upper reference) writes only the four
    keys a record needs; the rest take the record's defaults, and a missing required key is named."""
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    kept = [{"sha256": f"{i}" * 64, "path": "", "class_name": "", "class_index": -1} for i in range(2)]
    CleanSet.save_index(tmp_path, kept, {"kept": 2}, CLASSES)
    clean = CleanSet.load(tmp_path)
    assert clean.kept[1].classes == [] and clean.kept[1].num_urls == 1 and clean.kept[1].query is None
    assert clean.query_classes(CLASSES).tolist() == [-1, -1]
    with pytest.raises(ArtifactError, match="kept record 1 lacks class_index"):
        CleanSet.save_index(tmp_path, [kept[0], {k: v for k, v in kept[1].items() if k != "class_index"}], {}, CLASSES)


def test_class_lists_are_compared_by_name() -> None:
    check_classes(["Cat", "dog"], ["dog", "cat"], "teacher", "crawl")  # order and case do not matter
    with pytest.raises(ArtifactError, match="only in teacher: 'bird'; only in crawl: 'dog'"):
        check_classes(["cat", "bird"], ["cat", "dog"], "teacher", "crawl")


def test_the_fingerprint_sees_a_changed_row() -> None:
    a = np.zeros((200, 4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[-1, 0, 0, 0] = 1
    assert array_fingerprint(a) != array_fingerprint(b) and array_fingerprint(a) == array_fingerprint(a.copy())
