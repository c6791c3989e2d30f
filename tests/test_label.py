"""Transfer diagnostics: the teacher's predictions and the crawl queries as two views of the web pool."""

from __future__ import annotations

import numpy as np

from distill.label import transfer_diagnostics

CLASSES = ["cat", "dog", "bird", "fish"]


def pool(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    queries = rng.integers(0, 4, n)
    return queries, rng.uniform(0.5, 1.0, n)


def codes(d: dict) -> set[str]:  # type: ignore[type-arg]
    return {w["code"] for w in d["warnings"]}


def test_a_teacher_that_mostly_agrees_with_the_queries_raises_no_warning() -> None:
    queries, conf = pool()
    pred = queries.copy()
    pred[::4] = (pred[::4] + 1) % 4  # 75% agreement
    d = transfer_diagnostics(pred, conf, queries, CLASSES)
    assert codes(d) == set() and d["agreement"] == 0.75 and d["kappa"] > 0.6
    assert [c["crawled"] for c in d["per_class"]] == np.bincount(queries, minlength=4).tolist()


def test_a_collapsed_teacher_is_named_with_its_class_and_share() -> None:
    queries, conf = pool()
    pred = np.zeros_like(queries)
    pred[:4] = 1
    d = transfer_diagnostics(pred, conf, queries, CLASSES)
    assert {"collapse", "near_chance", "starved"} <= codes(d)
    collapse = next(w for w in d["warnings"] if w["code"] == "collapse")
    assert "99%" in collapse["message"] and "'cat'" in collapse["message"]


def test_agreement_by_chance_warns_even_without_collapse() -> None:
    queries, conf = pool()
    pred = np.random.default_rng(1).integers(0, 4, len(queries))  # independent of the queries
    d = transfer_diagnostics(pred, conf, queries, CLASSES)
    assert codes(d) == {"near_chance"} and abs(d["kappa"]) < 0.1


def test_a_class_the_teacher_never_predicts_is_starved() -> None:
    queries, conf = pool()
    pred = np.where(queries == 3, 0, queries)  # every "fish" image called "cat"
    d = transfer_diagnostics(pred, conf, queries, CLASSES)
    starved = next(w for w in d["warnings"] if w["code"] == "starved")
    assert "'fish'" in starved["message"] and d["per_class"][3]["teacher_share"] == 0.0


def test_images_of_unknown_query_count_for_shares_but_not_agreement() -> None:
    queries, conf = pool()
    unknown = queries.copy()
    unknown[:100] = -1
    d = transfer_diagnostics(queries.copy(), conf, unknown, CLASSES)
    assert d["agreement"] == 1.0 and sum(c["crawled"] for c in d["per_class"]) == len(queries) - 100


def partial_pool() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher knows cat and dog, and calls every bird and fish a cat."""
    queries, conf = pool()
    pred = np.where(queries >= 2, 0, queries)
    pred[::10] = (pred[::10] + 1) % 4
    return pred, conf, queries


def test_the_regime_says_whether_the_teacher_transfers_and_what_to_do() -> None:
    queries, conf = pool()
    agreeing = queries.copy()
    agreeing[::4] = (agreeing[::4] + 1) % 4
    transfers = transfer_diagnostics(agreeing, conf, queries, CLASSES)["regime"]
    assert transfers["code"] == "transfers" and "Distil as usual" in transfers["message"]
    partial = transfer_diagnostics(*partial_pool(), CLASSES)["regime"]
    assert partial["code"] == "partial"
    assert "'bird', 'fish'" in partial["message"] and "label_model" in partial["message"]
    collapsed = transfer_diagnostics(np.zeros_like(queries), conf, queries, CLASSES)["regime"]
    assert collapsed["code"] == "no_transfer" and "crawl images closer" in collapsed["message"]
    chance = transfer_diagnostics(np.random.default_rng(1).integers(0, 4, len(queries)), conf, queries, CLASSES)
    assert chance["regime"]["code"] == "no_transfer" and "no better than chance" in chance["regime"]["message"]


def test_per_class_estimates_find_the_classes_the_teacher_gets_wrong() -> None:
    d = transfer_diagnostics(*partial_pool(), CLASSES)
    teacher = {c["class"]: c["teacher_accuracy_est"] for c in d["per_class"]}
    assert teacher["cat"] > 0.7 and teacher["dog"] > 0.7 and teacher["bird"] < 0.2 and teacher["fish"] < 0.2
    assert all(c["query_accuracy_est"] > 0.7 for c in d["per_class"])
    precision = {c["class"]: c["teacher_precision_est"] for c in d["per_class"]}
    assert precision["dog"] > 0.8 and precision["cat"] < 0.5  # every bird and fish is called a cat
    assert d["annotators"]["unreliable_classes"] == ["cat", "bird", "fish"] and d["annotators"]["converged"]
    assert all(0 <= c["junk_share_est"] <= 1 for c in d["per_class"])
