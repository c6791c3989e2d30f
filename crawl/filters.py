"""Per-image keep/drop rules of the clean stage: pure functions, each drop with a reason code.

The statistics come from ``crawl.images.analyze_file`` (one decode per file). Rules, in order:
the decode's own reason (``unidentified``, ``truncated``, ...), then ``too_small`` (shorter side),
``bad_aspect`` (long/short side), ``blank`` (largest per-channel standard deviation: a
near-uniform image) and ``low_information`` (entropy of the grey histogram in bits: flat
graphics with a handful of levels).
"""

from __future__ import annotations

from typing import Any

from crawl.settings import FilterParams


def filter_reason(rec: dict[str, Any], p: FilterParams) -> str | None:
    """The reason to drop one analysed record, or None to keep it."""
    if rec.get("reason"):
        return str(rec["reason"])
    w, h = rec["width"], rec["height"]
    if min(w, h) < p.min_side:
        return "too_small"
    if max(w, h) / max(1, min(w, h)) > p.max_aspect:
        return "bad_aspect"
    if rec["std"] < p.min_std:
        return "blank"
    if rec["entropy"] < p.min_entropy:
        return "low_information"
    return None


def apply_filters(records: list[dict[str, Any]], p: FilterParams) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records into (kept, dropped); each dropped record gets its ``reason``."""
    kept, dropped = [], []
    for rec in records:
        reason = filter_reason(rec, p)
        if reason is None:
            kept.append(rec)
        else:
            dropped.append({**rec, "reason": reason})
    return kept, dropped
