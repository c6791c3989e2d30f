"""Batched teacher inference: logits for an array of images, and the metrics computed from them.

Used by the label stage (pseudo-labels for the web pool) and the evaluate stage (accuracy on a
labelled set). Inference runs under ``torch.inference_mode`` and, on CUDA, bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.data import batches, to_float
from distill.losses import query_log_prior


def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    *,
    input_size: int,
    in_chans: int,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, K) float32 logits."""
    out = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for sl in batches(len(images), batch_size):
            x = to_float(images[sl], input_size, device, in_chans)
            out.append(model(x).float().cpu().numpy())
            if progress:
                progress(sl.stop - sl.start)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    return np.bincount(truth * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


# --------------------------------------------------------------------------------------------
# does the teacher transfer to the web pool?
# --------------------------------------------------------------------------------------------

COLLAPSE_SHARE = 0.5  # one class predicted for more than this, and twice its crawled share, of the pool: collapse
MIN_KAPPA = 0.2  # teacher-query agreement below this Cohen's kappa is "slight" (Landis & Koch 1977)
STARVED_RATIO = 0.2  # a class predicted for under a fifth of the share its queries crawled: starved
# the regime, from the annotator model's estimates
TRANSFER_KAPPA = 0.6  # the teacher's estimated accuracy this far from chance to its best: it transfers
NO_TRANSFER_KAPPA = 0.2  # below this: it does not transfer ("slight", as MIN_KAPPA)
INDEPENDENT_KAPPA = 0.1  # teacher-query agreement this near chance: whose accuracy is whose cannot be told
UNRELIABLE_ACCURACY = 0.5  # the teacher's recall or the precision of its calls of a class below this: unreliable


def transfer_diagnostics(
    pred: np.ndarray,
    conf: np.ndarray,
    queries: np.ndarray,
    classes: list[str],
    annotators: Annotators | None = None,
) -> dict[str, Any]:
    """How the teacher sees the web pool, per class and overall, with warnings a user can act on.

    Each web image has two noisy labels: the teacher's prediction ``pred`` and the class its query
    was for (``queries``, -1 when unknown). Where the teacher transfers, the two agree far more often
    than chance; where it collapses onto a few classes or agrees only by chance, distillation from
    its labels cannot recover the classes and more distillation will not help. The annotator model
    (``fit_annotators``, fitted here unless given) estimates per class how often each label is
    right and how much of what was crawled for it is junk, and names the regime.

    Returns ``{"per_class": [...], "agreement", "chance_agreement", "kappa", "annotators": {...},
    "regime": {code, message}, "warnings": [{code, message}]}``; per class, the ``*_est`` keys are
    the annotator model's estimates.
    """
    k = len(classes)
    n = max(len(pred), 1)
    known = queries >= 0
    pred_share = np.bincount(pred, minlength=k) / n
    query_count = np.bincount(queries[known], minlength=k)
    query_share = query_count / max(int(known.sum()), 1)
    agree = float((pred[known] == queries[known]).mean()) if known.any() else 0.0
    chance = float((np.bincount(pred[known], minlength=k) / max(int(known.sum()), 1) * query_share).sum())
    kappa = (agree - chance) / (1 - chance) if chance < 1 else 0.0
    model = fit_annotators(pred, conf, queries, k) if annotators is None else annotators
    teacher_acc, query_acc, precision = model.teacher_accuracy(), model.query_accuracy(), model.teacher_call_precision()
    junk = model.junk_posterior(pred, conf, queries)
    junk_crawled = np.bincount(queries[known], weights=junk[known], minlength=k) / np.maximum(query_count, 1)
    per_class = []
    for c, name in enumerate(classes):
        mine = known & (queries == c)
        per_class.append(
            {
                "class": name,
                "crawled": int(query_count[c]),  # images whose query was for this class
                "teacher_share": round(float(pred_share[c]), 4),  # share of the pool the teacher calls this class
                "agreement": round(float((pred[mine] == c).mean()), 4) if mine.any() else None,
                "confidence": round(float(conf[pred == c].mean()), 4) if (pred == c).any() else None,
                "teacher_accuracy_est": round(float(teacher_acc[c]), 4),  # P(teacher calls c | an image of c)
                "teacher_precision_est": round(float(precision[c]), 4),  # P(an image of c | teacher calls c)
                "query_accuracy_est": round(float(query_acc[c]), 4),  # P(crawled for c | an image of c)
                "junk_share_est": round(float(junk_crawled[c]), 4) if mine.any() else None,  # of those crawled for c
            }
        )
    summary = _annotator_summary(model, pred_share, classes)
    warnings = []
    top = int(pred_share.argmax()) if len(pred) else 0
    expected = query_share[top] if known.any() else 1 / k
    if len(pred) and pred_share[top] > max(COLLAPSE_SHARE, 2 * expected):
        warnings.append(
            {
                "code": "collapse",
                "message": (
                    f"the teacher calls {pred_share[top]:.0%} of the web pool {classes[top]!r} (median confidence "
                    f"{float(np.median(conf[pred == top])):.2f}): its predictions collapse onto one class, so the web "
                    "images look unlike its training data. Crawl images closer to it (other queries, engines or "
                    "sources), or check the teacher's input size and mean/std."
                ),
            }
        )
    if known.any() and kappa < MIN_KAPPA:
        warnings.append(
            {
                "code": "near_chance",
                "message": (
                    f"the teacher agrees with the crawl queries on {agree:.0%} of the images, against {chance:.0%} by "
                    f"chance (kappa {kappa:.2f}): either the crawl found mostly other things, or the teacher does not "
                    "transfer to these images. Look at the clean stage's contact sheets before distilling."
                ),
            }
        )
    starved = [classes[c] for c in range(k) if query_share[c] > 0 and pred_share[c] < STARVED_RATIO * query_share[c]]
    if starved:
        warnings.append(
            {
                "code": "starved",
                "message": (
                    f"the teacher almost never predicts {', '.join(map(repr, starved[:6]))} on the web pool "
                    "(under a fifth of the share their queries crawled): the student will learn little about them."
                ),
            }
        )
    return {
        "per_class": per_class,
        "agreement": round(agree, 4),
        "chance_agreement": round(chance, 4),
        "kappa": round(kappa, 4),
        "annotators": summary,
        "regime": _regime(summary, kappa if known.any() else None, classes),
        "warnings": warnings,
    }


def _annotator_summary(model: Annotators, pred_share: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The annotator model's overall estimates (class-prior weighted), for the report."""
    teacher = float(model.prior @ model.teacher_accuracy())
    chance = float(model.prior @ pred_share)  # a teacher that calls classes at its rates, blind to the image
    # unreliable: the teacher misses the class, or its calls of it are often other classes (a collapse)
    worst = np.minimum(model.teacher_accuracy(), model.teacher_call_precision())
    unreliable = [c for c, a in zip(classes, worst, strict=True) if a < UNRELIABLE_ACCURACY]
    return {
        "teacher_accuracy": round(teacher, 4),
        "teacher_chance": round(chance, 4),
        "teacher_kappa": round((teacher - chance) / (1 - chance), 4) if chance < 1 else 0.0,
        "query_accuracy": round(float(model.prior @ model.query_accuracy()), 4),
        "junk_share": round(model.junk_share(), 4),
        "unreliable_classes": unreliable,
        "iterations": model.iterations,
        "converged": model.converged,
    }


def _regime(summary: dict[str, Any], kappa: float | None, classes: list[str]) -> dict[str, str]:
    """Does the teacher transfer, in part, or not at all, and what to do about it."""
    t, q, chance = summary["teacher_accuracy"], summary["query_accuracy"], summary["teacher_chance"]
    unreliable = summary["unreliable_classes"]
    if summary["teacher_kappa"] < NO_TRANSFER_KAPPA or (kappa is not None and kappa < INDEPENDENT_KAPPA):
        why = (
            f"the annotator model puts its accuracy on the web pool at {t:.0%}, {chance:.0%} by chance"
            if summary["teacher_kappa"] < NO_TRANSFER_KAPPA
            else f"it agrees with the crawl queries no better than chance (kappa {kappa:.2f}), so its accuracy "
            "cannot be told from the query's"
        )
        return {
            "code": "no_transfer",
            "message": (
                f"the teacher does not transfer to the web images: {why}. No distillation method can help: "
                "crawl images closer to its training data (other queries, engines or sources), or check its "
                "input size and mean/std."
            ),
        }
    if summary["teacher_kappa"] >= TRANSFER_KAPPA and len(unreliable) <= 0.1 * len(classes):
        return {
            "code": "transfers",
            "message": (
                f"the teacher transfers: the annotator model puts its accuracy on the web pool at {t:.0%} "
                f"(the crawl query's: {q:.0%}; junk {summary['junk_share']:.0%}). Distil as usual."
            ),
        }
    names = ", ".join(map(repr, unreliable[:6])) + (" …" if len(unreliable) > 6 else "")
    where = f", and it is unreliable on {len(unreliable)} of {len(classes)} classes ({names})"
    return {
        "code": "partial",
        "message": (
            f"the teacher transfers in part: the annotator model puts its accuracy on the web pool at {t:.0%} "
            f"against the crawl query's {q:.0%}{where if unreliable else ''}. The query should dominate where the "
            "teacher is unreliable: keep the crawl query as a prior (distill.kd3.query_prior), or set "
            "distill.kd3.label_model (distill.kd.label_model) to annotators to let it dominate only there."
        ),
    }


# --------------------------------------------------------------------------------------------
# the teacher and the crawl query as two noisy annotators (Dawid & Skene 1979)
# --------------------------------------------------------------------------------------------
#
# Each web image has a latent true class y and two labels: the class q whose crawl query found it
# (-1: several classes' queries did) and the teacher's call a, in confidence bin b. With two
# annotators, full K×K confusion matrices are not identifiable (any invertible mixing of the two
# fits the K×K agreement table as well; EM started from the query stays at "the query is always
# right"). So each annotator either knows the class, with a per-class probability, or guesses:
#
#   P(q | y)    = ρ_y [q = y] + (1 − ρ_y) μ_q                 the query's confusion
#   P(a, b | y) = τ_y κ_b [a = y] + (1 − τ_y) ν_{b,a}         the teacher's, with its confidence
#
# ρ_y, τ_y: how often the query / the teacher knows class y; μ: the query's guesses (wrong-class
# hits); ν: the teacher's guesses and their confidence (a collapsed teacher guesses one class);
# κ: the teacher's confidence when it knows. An image of none of the classes and a class image both
# annotators only guess on carry the same two labels, so the pool cannot tell them apart: "junk" is
# the state in which neither annotator knows, with the two guess distributions as its own.
# The E-step is O(1) per distinct (q, b, a): for every class but q and a the joint is the same
# vector π_y (1 − ρ_y)(1 − τ_y) times one number, so no (N, K) array is ever built.

QUERY_ACCURACY_START = 0.7  # the start, and the belief where the pool cannot tell: the query right 70% of the time
PRIOR_IMAGES = 1.0  # weight, in images per class, of the Beta/Dirichlet priors centred on the start
CLASS_BALANCE = 1.0  # weight, as a share of the pool, of the class prior's Dirichlet centred on the crawl's shares
TEACHER_BINS = 4  # confidence bins: quantiles of the pool's top softmax probability
BALANCE_ITERS = 30  # fixed-point steps that match the start's class totals to the crawl's
EM_MAX_ITER = 500
EM_TOL = 1e-7  # stop when an iteration gains less than this many nats per image


@dataclass(frozen=True)
class _Params:
    prior: np.ndarray  # (K,) P(y)
    rho: np.ndarray  # (K,) P(the query knows | y)
    mu: np.ndarray  # (K,) the query's guesses
    tau: np.ndarray  # (K,) P(the teacher knows | y)
    kappa: np.ndarray  # (B,) the teacher's confidence bin when it knows
    nu: np.ndarray  # (B, K) the teacher's (bin, call) when it guesses


@dataclass(frozen=True)
class _Observations:
    """The pool grouped by distinct (query, bin, call): the EM's cost follows these, not the images."""

    q: np.ndarray  # (U,) query class, -1 unknown
    b: np.ndarray  # (U,) confidence bin
    a: np.ndarray  # (U,) the teacher's call
    w: np.ndarray  # (U,) images with this observation
    conf: np.ndarray  # (U,) their mean confidence
    inverse: np.ndarray  # (N,) image -> observation


@dataclass(frozen=True)
class _Posterior:
    """The E-step per observation. For y ∉ {q, a}: P(y | obs) = bg · π_y (1 − ρ_y)(1 − τ_y) (query
    known) or bg · π_y (1 − τ_y) (unknown)."""

    z: np.ndarray  # (U,) P(obs)
    bg: np.ndarray  # (U,) the both-guess scale
    rq: np.ndarray  # (U,) P(y = q | obs) when q is known and differs from a, else 0
    ra: np.ndarray  # (U,) P(y = a | obs)
    kq: np.ndarray  # (U,) P(the query knows | y = q, obs)
    kt: np.ndarray  # (U,) P(the teacher knows | y = a, obs)
    junk: np.ndarray  # (U,) P(neither knows | obs)


@dataclass(frozen=True)
class Annotators:
    """The annotator model: fitted by ``fit_annotators``, or the fixed query prior (``fixed``)."""

    prior: np.ndarray  # (K,) class prior
    query_knows: np.ndarray  # (K,) ρ
    query_guess: np.ndarray  # (K,) μ
    teacher_knows: np.ndarray  # (K,) τ
    knows_bins: np.ndarray  # (B,) κ
    teacher_guess: np.ndarray  # (B, K) ν
    bin_edges: np.ndarray  # (B-1,) a call of confidence c is in bin searchsorted(edges, c, "right")
    weigh_junk: bool = True  # down-weight each image by 1 − P(junk | its labels) (off: the fixed prior)
    iterations: int = 0
    converged: bool = True
    objective: tuple[float, ...] = ()  # log-likelihood + log-prior after each E-step (never decreases)

    @property
    def num_classes(self) -> int:
        return len(self.prior)

    @property
    def bins(self) -> int:
        return len(self.knows_bins)

    def query_confusion(self) -> np.ndarray:
        """(K, K) P(q | y): row = true class, column = the class whose query found the image."""
        return (1 - self.query_knows)[:, None] * self.query_guess[None] + np.diag(self.query_knows)

    def teacher_confusion(self) -> np.ndarray:
        """(K, K) P(a | y): row = true class, column = the teacher's call, at any confidence."""
        guess = self.teacher_guess.sum(0)
        return (1 - self.teacher_knows)[:, None] * guess[None] + np.diag(self.teacher_knows)

    def teacher_confusion_by_bin(self) -> np.ndarray:
        """(B, K, K) P(a | y, b): the teacher's confusion among its calls in confidence bin b."""
        eye = np.eye(self.num_classes)[None]
        joint = self.teacher_knows[None, :, None] * self.knows_bins[:, None, None] * eye
        joint = joint + (1 - self.teacher_knows)[None, :, None] * self.teacher_guess[:, None, :]  # (B, K, K)
        return joint / joint.sum(2, keepdims=True)

    def _calls(self) -> tuple[np.ndarray, np.ndarray]:
        """(B, K) P(a, b, y = a) and P(a, b): the teacher's calls of class a in bin b, right and all."""
        know = self.teacher_knows[None] * self.knows_bins[:, None]  # (B, K) τ_a κ_b
        right = self.prior[None] * (know + (1 - self.teacher_knows)[None] * self.teacher_guess)
        guessing = float((self.prior * (1 - self.teacher_knows)).sum())
        return right, self.teacher_guess * guessing + self.prior[None] * know

    def teacher_precision(self) -> np.ndarray:
        """(B, K) P(y = a | a, b) from the teacher's labels alone: how often a call of class a in
        confidence bin b is right."""
        right, calls = self._calls()
        return right / calls

    def teacher_call_precision(self) -> np.ndarray:
        """(K,) P(y = a | a): how often the teacher's call of each class is right, at any confidence
        (low for the class a collapsed teacher calls everything)."""
        right, calls = self._calls()
        return right.sum(0) / calls.sum(0)

    def query_accuracy(self) -> np.ndarray:
        """(K,) P(q = y | y)."""
        return np.diag(self.query_confusion()).copy()

    def teacher_accuracy(self) -> np.ndarray:
        """(K,) P(a = y | y)."""
        return np.diag(self.teacher_confusion()).copy()

    def junk_share(self) -> float:
        """The pool's share that neither annotator knows (junk, or a class image both only guess on)."""
        return float((self.prior * (1 - self.query_knows) * (1 - self.teacher_knows)).sum())

    def posterior(self, pred: np.ndarray, conf: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """(N, K + 1): P(y | q, a, b) for each class, then P(junk | q, a, b), which overlaps them."""
        b = np.searchsorted(self.bin_edges, conf, side="right")
        known = queries >= 0
        qc = np.where(known, queries, 0)
        rows = np.arange(len(pred))
        fq = (1 - self.query_knows)[None] * self.query_guess[qc][:, None]  # (N, K) P(q | y)
        fq[rows, qc] += self.query_knows[qc]
        fq = np.where(known[:, None], fq, 1.0)
        guess = self.teacher_guess[b, pred]  # (N,)
        ft = (1 - self.teacher_knows)[None] * guess[:, None]  # (N, K) P(a, b | y)
        ft[rows, pred] += self.teacher_knows[pred] * self.knows_bins[b]
        joint = self.prior[None] * fq * ft
        z = joint.sum(1)
        junk = np.where(known, self.query_guess[qc], 1.0) * guess * self.junk_share()
        return np.concatenate([joint / z[:, None], (junk / z)[:, None]], axis=1)

    def junk_posterior(self, pred: np.ndarray, conf: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """(N,) P(junk | q, a, b), in O(N + K) (``posterior`` builds the (N, K + 1) array)."""
        params = _Params(
            self.prior, self.query_knows, self.query_guess, self.teacher_knows, self.knows_bins, self.teacher_guess
        )
        o = _observations(
            np.asarray(pred, dtype=np.int64),
            np.asarray(conf, dtype=np.float64),
            np.asarray(queries, dtype=np.int64),
            self.num_classes,
            self.bin_edges,
        )
        return _e_step(params, o).junk[o.inverse]

    @classmethod
    def fixed(cls, num_classes: int, rho: float, bins: int = 1) -> Annotators:
        """The fixed query prior ρ (``losses.query_log_prior``) as this model: uniform classes, every
        class's query accuracy ρ with uniform wrong hits, a teacher whose call carries no evidence (it
        never "knows"), and no image down-weighted. Its posterior P(y | q, a, b) is then π_ρ(y | q).

        The query "knows" with r = (ρK − 1)/(K − 1), so P(q = y | y) = r + (1 − r)/K = ρ and, as a
        function of y, P(q | y) ∝ ρ at y = q and (1 − ρ)/(K − 1) elsewhere. Below ρ = 1/K, r is
        negative: the factor is then a likelihood against the query class, as such a ρ says.
        """
        k = num_classes
        return cls(
            prior=np.full(k, 1 / k),
            query_knows=np.full(k, (rho * k - 1) / max(k - 1, 1)),
            query_guess=np.full(k, 1 / k),
            teacher_knows=np.zeros(k),
            knows_bins=np.full(bins, 1 / bins),
            teacher_guess=np.full((bins, k), 1 / (bins * k)),
            bin_edges=np.linspace(0, 1, bins + 1)[1:-1],
            weigh_junk=False,
        )


def teacher_calls(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) logits -> the teacher's call (argmax) and its confidence (top softmax probability)."""
    z = np.asarray(logits, dtype=np.float32)
    top = z.max(axis=1, keepdims=True)
    conf = 1.0 / np.exp(z - top).sum(axis=1)  # exp(top − logsumexp)
    return z.argmax(axis=1), conf.astype(np.float64)


def _normalised(counts: np.ndarray, pseudo: np.ndarray | float) -> np.ndarray:
    x = counts + pseudo
    return x / x.sum()


def _observations(pred: np.ndarray, conf: np.ndarray, queries: np.ndarray, k: int, edges: np.ndarray) -> _Observations:
    cells = (len(edges) + 1) * k
    b = np.searchsorted(edges, conf, side="right")
    key = (queries + 1) * cells + b * k + pred  # unknown query (-1) -> 0
    uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    w = counts.astype(np.float64)
    return _Observations(
        q=uniq // cells - 1,
        b=(uniq % cells) // k,
        a=uniq % k,
        w=w,
        conf=np.bincount(inverse, weights=conf, minlength=len(w)) / np.maximum(w, 1),
        inverse=inverse.reshape(-1),
    )


def _e_step(p: _Params, o: _Observations) -> _Posterior:
    known = o.q >= 0
    qc = np.where(known, o.q, 0)
    same = known & (o.q == o.a)
    m = np.where(known, p.mu[qc], 1.0)  # the query guessed q (1: unobserved)
    n = p.nu[o.b, o.a]  # the teacher guessed (b, a)
    fq_q = p.rho[qc] + (1 - p.rho[qc]) * m  # P(q | y = q)
    ft_a = p.tau[o.a] * p.kappa[o.b] + (1 - p.tau[o.a]) * n  # P(a, b | y = a)
    g = p.prior * (1 - p.rho) * (1 - p.tau)  # (K,) both guess
    h = p.prior * (1 - p.tau)  # (K,) the teacher guesses, the query unobserved
    rest = np.where(known, g.sum() - g[qc] - np.where(same, 0.0, g[o.a]), h.sum() - h[o.a])
    bg = m * n
    lq = np.where(known & ~same, p.prior[qc] * fq_q * (1 - p.tau[qc]) * n, 0.0)  # y = q, teacher guessed a
    la = p.prior[o.a] * np.where(same, fq_q, np.where(known, (1 - p.rho[o.a]) * m, 1.0)) * ft_a  # y = a
    z = bg * np.maximum(rest, 0.0) + lq + la
    return _Posterior(
        z=z,
        bg=bg / z,
        rq=lq / z,
        ra=la / z,
        kq=np.where(known, p.rho[qc] / fq_q, 0.0),
        kt=p.tau[o.a] * p.kappa[o.b] / ft_a,
        junk=bg * g.sum() / z,
    )


def _statistics(p: _Params, o: _Observations, e: _Posterior) -> dict[str, np.ndarray]:
    """Expected counts given the E-step: images per class, and who knew or guessed what."""
    k, nb = len(p.prior), len(p.kappa)
    known = o.q >= 0
    qc = np.where(known, o.q, 0)
    other = known & (o.q != o.a)
    g = p.prior * (1 - p.rho) * (1 - p.tau)
    h = p.prior * (1 - p.tau)
    wbg = o.w * e.bg

    def per_class(idx: np.ndarray, weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.bincount(idx[mask], weights=weight[mask], minlength=k)

    # images of class y: the both-guess background of every row where y is neither q nor a, plus the
    # rows that name y; the query's counts use only the rows whose query is known
    with_query = g * (wbg[known].sum() - per_class(qc, wbg, known) - per_class(o.a, wbg, other))
    with_query += per_class(qc, o.w * e.rq, other) + per_class(o.a, o.w * e.ra, known)
    images = with_query + h * (wbg[~known].sum() - per_class(o.a, wbg, ~known)) + per_class(o.a, o.w * e.ra, ~known)
    query_knew = o.w * np.where(o.q == o.a, e.ra, e.rq) * e.kq  # (U,)
    teacher_knew = o.w * e.ra * e.kt
    return {
        "images": images,
        "with_query": with_query,
        "query_knew": per_class(qc, query_knew, known),
        "query_guessed": per_class(qc, o.w - query_knew, known),
        "teacher_knew": np.bincount(o.a, weights=teacher_knew, minlength=k),
        "knew_bins": np.bincount(o.b, weights=teacher_knew, minlength=nb),
        "guessed_cells": np.bincount(o.b * k + o.a, weights=o.w - teacher_knew, minlength=nb * k).reshape(nb, k),
    }


def _m_step(stats: dict[str, np.ndarray], start: _Params, s: float, share: np.ndarray, balance: float) -> _Params:
    """MAP update: counts plus the priors' pseudo-counts, ``s`` images per class centred on the start,
    and ``balance`` images on the class prior centred on the crawl's class shares ``share``."""
    k, nb = len(start.prior), len(start.kappa)
    return _Params(
        prior=_normalised(stats["images"], s * k * start.prior + balance * share),
        rho=(stats["query_knew"] + s * start.rho) / (stats["with_query"] + s),
        mu=_normalised(stats["query_guessed"], s * k * start.mu),
        tau=(stats["teacher_knew"] + s * start.tau) / (stats["images"] + s),
        kappa=_normalised(stats["knew_bins"], s * nb * start.kappa),
        nu=_normalised(stats["guessed_cells"], s * nb * k * start.nu),
    )


def _log_prior(p: _Params, start: _Params, s: float, share: np.ndarray, balance: float) -> float:
    """log of the priors ``_m_step`` maximises (Beta/Dirichlet with the start as mean), up to a constant."""
    k, nb = len(p.prior), len(p.kappa)
    out = (s * k * start.prior + balance * share) @ np.log(p.prior) + s * k * (start.mu @ np.log(p.mu))
    out += s * nb * (start.kappa @ np.log(p.kappa)) + s * nb * k * float((start.nu * np.log(p.nu)).sum())
    for x, x0 in ((p.rho, start.rho), (p.tau, start.tau)):
        out += s * float((x0 * np.log(x) + (1 - x0) * np.log1p(-x)).sum())
    return float(out)


def _start(o: _Observations, share: np.ndarray, k: int, nb: int, query_accuracy: float) -> _Params:
    """Where the EM starts, and what the priors hold to where the pool cannot tell: the query right
    ``query_accuracy`` of the time with uniform wrong hits; the teacher knowing as often as its
    confidence says (its unsure mass is its guessing); and a class prior chosen so that the start's
    class totals equal the crawl's (the crawl asks for a set number of images per class). Starting
    from both annotators this way, the classes cannot switch labels, and a teacher that calls most
    of the pool one class starts out (and stays) outvoted by the queries."""
    total = max(float(o.w.sum()), 1.0)
    knows = float((o.w * o.conf).sum()) / total if len(o.w) else 0.5
    unsure = np.bincount(o.b * k + o.a, weights=o.w * (1 - o.conf), minlength=nb * k)
    p = _Params(
        prior=share,
        rho=np.full(k, query_accuracy),
        mu=np.full(k, 1.0 / k),
        tau=np.full(k, float(np.clip(knows, 0.05, 0.95))),
        kappa=_normalised(np.bincount(o.b, weights=o.w * o.conf, minlength=nb), 1.0 / nb),
        nu=_normalised(unsure.reshape(nb, k), 1.0 / (nb * k)),
    )
    for _ in range(BALANCE_ITERS):
        images = _statistics(p, o, _e_step(p, o))["images"]
        p = replace(p, prior=_normalised(p.prior * share / np.maximum(images / total, 1e-12), 0.0))
    return p


def fit_annotators(
    pred: np.ndarray,
    conf: np.ndarray,
    queries: np.ndarray,
    num_classes: int,
    *,
    bins: int = TEACHER_BINS,
    query_accuracy: float = QUERY_ACCURACY_START,
    prior_images: float = PRIOR_IMAGES,
    class_balance: float = CLASS_BALANCE,
    max_iter: int = EM_MAX_ITER,
    tol: float = EM_TOL,
) -> Annotators:
    """Fit the annotator model to the pool by EM (Dawid & Skene 1979, with per-class "knows or
    guesses" confusions; see the block comment above). Deterministic: no random start.

    ``pred``, ``conf``: the teacher's call and top softmax probability per image (``teacher_calls``);
    ``queries``: the crawled-for class, -1 when unknown. Every parameter has a Beta/Dirichlet prior
    of ``prior_images`` images per class centred on the start, so no cell is ever 0 and the estimates
    stay at the start only in directions the pool cannot inform. The class prior's also weighs
    ``class_balance`` times the pool's images, centred on the crawl's class shares: a crawl asks for
    the same number of images per class, and without it the EM explains a teacher that calls most of
    the pool one class as a pool that mostly is that class. Stops after ``max_iter`` iterations or
    when one gains under ``tol`` nats per image.
    """
    k = num_classes
    pred = np.asarray(pred, dtype=np.int64)
    conf = np.asarray(conf, dtype=np.float64)
    queries = np.asarray(queries, dtype=np.int64)
    if not len(pred) == len(conf) == len(queries):
        raise ValueError(f"fit_annotators: {len(pred)} calls, {len(conf)} confidences and {len(queries)} queries")
    if len(pred) and (pred.min() < 0 or pred.max() >= k or queries.max() >= k or queries.min() < -1):
        raise ValueError(f"fit_annotators: a call or query outside the {k} classes")
    edges = np.quantile(conf, np.arange(1, bins) / bins) if len(conf) else np.linspace(0, 1, bins + 1)[1:-1]
    o = _observations(pred, conf, queries, k, edges)
    share = _normalised(np.bincount(queries[queries >= 0], minlength=k).astype(np.float64), 1.0 / k)
    start = _start(o, share, k, bins, query_accuracy)
    balance = class_balance * float(o.w.sum())  # in images
    p, objective, converged = start, [], False
    per_image = tol * max(float(o.w.sum()), 1.0)
    for _ in range(max_iter):
        e = _e_step(p, o)
        objective.append(float(o.w @ np.log(e.z)) + _log_prior(p, start, prior_images, share, balance))
        if len(objective) > 1 and objective[-1] - objective[-2] < per_image:
            converged = True
            break
        p = _m_step(_statistics(p, o, e), start, prior_images, share, balance)
    return Annotators(
        prior=p.prior,
        query_knows=p.rho,
        query_guess=p.mu,
        teacher_knows=p.tau,
        knows_bins=p.kappa,
        teacher_guess=p.nu,
        bin_edges=edges,
        iterations=len(objective),
        converged=converged,
        objective=tuple(objective),
    )


class AnnotatorPrior(nn.Module):
    """The annotator model on the device: per image of a batch, the log prior its KD target and its
    selection score add to the teacher's logits, and how clean it is.

    ``forward(o_T, q)`` returns ``log_prior`` (B, K) = log P(y | q, a, b), the posterior given both
    labels (a, b: the teacher's call and its confidence bin), and ``clean`` (B,) = 1 − P(junk | q, a, b)
    (1 for the fixed prior). The KD target is

        softmax(o_T/T + log P(y | q, a, b))

    the teacher's softened output (its dark knowledge) times the posterior, which decides the class
    at full strength, as a hard label would: it follows the teacher's call where the EM found such
    calls right and lets the query decide where the teacher collapses or confuses a class. Among the
    other classes the posterior is the same both-guess background times the class prior, so their
    mass keeps the teacher's ratios. Selection adds the same prior to the teacher's and the
    student's logits and multiplies each confidence by ``clean``; the KD loss weighs each image by
    ``clean`` over its pool mean (``LabelPrior``). Every step is a gather or a ``where`` on the
    device: nothing is read back to the host. For ``Annotators.fixed(K, ρ)`` the posterior is
    π_ρ(y | q), so the target is exactly ``softmax(o_T/T + query_log_prior(q, K, ρ))``.
    """

    log_class_prior: torch.Tensor
    query_knows: torch.Tensor
    query_guess: torch.Tensor
    teacher_knows: torch.Tensor
    knows_bins: torch.Tensor
    teacher_guess: torch.Tensor
    bin_edges: torch.Tensor
    junk_mass: torch.Tensor
    clean_share: torch.Tensor

    def __init__(self, model: Annotators) -> None:
        super().__init__()
        self.model = model
        self.weigh_junk = model.weigh_junk
        tables = {
            "log_class_prior": np.log(model.prior),
            "query_knows": model.query_knows,
            "query_guess": model.query_guess,
            "teacher_knows": model.teacher_knows,
            "knows_bins": model.knows_bins,
            "teacher_guess": model.teacher_guess,
            "bin_edges": model.bin_edges,
            "junk_mass": np.asarray(model.junk_share()),
            "clean_share": np.asarray(max(1 - model.junk_share(), 0.05)),
        }
        for name, value in tables.items():
            # not in the state dict: a resumed run refits them from the same rows
            self.register_buffer(name, torch.as_tensor(np.asarray(value), dtype=torch.float32), persistent=False)

    def forward(self, teacher_logits: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conf, call = torch.softmax(teacher_logits.float(), dim=1).max(dim=1)  # (B,) the teacher's labels
        b = torch.bucketize(conf, self.bin_edges, right=True)  # as np.searchsorted(..., "right")
        guessed = self.teacher_guess[b, call]  # (B,)
        ft = (1 - self.teacher_knows)[None] * guessed[:, None]  # (B, K) P(a, b | y)
        ft = ft.scatter_add(1, call[:, None], (self.teacher_knows[call] * self.knows_bins[b])[:, None])
        known = queries >= 0
        qc = queries.clamp_min(0)
        fq = (1 - self.query_knows)[None] * self.query_guess[qc][:, None]  # (B, K) P(q | y)
        fq = fq.scatter_add(1, qc[:, None], self.query_knows[qc][:, None])
        fq = torch.where(known[:, None], fq, torch.ones_like(fq))
        log_joint = self.log_class_prior[None] + torch.log(fq) + torch.log(ft)  # (B, K) log P(y, q, a, b)
        log_obs = torch.logsumexp(log_joint, dim=1)  # (B,) log P(q, a, b)
        clean = torch.ones_like(conf)
        if self.weigh_junk:
            junk = torch.where(known, self.query_guess[qc], clean) * guessed * self.junk_mass
            clean = (1 - torch.exp(torch.log(junk) - log_obs)).clamp(0.0, 1.0)
        return log_joint - log_obs[:, None], clean

    def describe(self) -> str:
        """The fit in one line, for the methods' ``describe``."""
        m = self.model
        return (
            f"annotator model (EM, {m.iterations} iterations): teacher accuracy "
            f"{float(m.prior @ m.teacher_accuracy()):.2f}, query accuracy {float(m.prior @ m.query_accuracy()):.2f}, "
            f"junk {m.junk_share():.0%}"
        )


def annotator_prior(teacher_logits: torch.Tensor, queries: torch.Tensor) -> AnnotatorPrior:
    """Fit the annotator model on the training rows' cached teacher logits (N, K) and crawl queries
    (N,), once when a method is set up, and return it ready for ``.to(device)``."""
    pred, conf = teacher_calls(teacher_logits.detach().float().cpu().numpy())
    model = fit_annotators(pred, conf, queries.detach().cpu().numpy(), teacher_logits.shape[1])
    return AnnotatorPrior(model)


class LabelPrior(nn.Module):
    """What a distillation method adds to the teacher's logits for its KD target and its selection
    score: nothing, the fixed query prior ρ (``label_model: fixed``, ``query_prior: ρ``; 0: off),
    or the annotator model (``label_model: annotators``), fitted by ``fit`` once, on the training
    rows' cached teacher logits and crawl queries, before training (``Method.prepare``)."""

    def __init__(self, label_model: str, query_prior: float) -> None:
        super().__init__()
        if label_model not in ("fixed", "annotators"):
            raise ValueError(f"label_model {label_model!r}: expected fixed or annotators")
        self.label_model, self.rho = label_model, query_prior
        self.annotators: AnnotatorPrior | None = None

    def fit(self, teacher_logits: torch.Tensor, queries: torch.Tensor) -> None:
        if self.label_model == "annotators":
            self.annotators = annotator_prior(teacher_logits, queries)

    def _annotators(self) -> AnnotatorPrior:
        if self.annotators is None:
            raise RuntimeError("label_model annotators: fit the model first (Method.prepare; the trainer calls it)")
        return self.annotators

    def kd(
        self, teacher_logits: torch.Tensor, queries: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(log prior (B, K) for ``kd_logit``, per-image weight (B,)), each None when unused. The weight is
        1 − P(junk) over its pool mean: junk counts less, and the KD term keeps its scale."""
        if queries is None:
            return None, None
        if self.label_model == "fixed":
            return (query_log_prior(queries, teacher_logits.shape[1], self.rho), None) if self.rho else (None, None)
        model = self._annotators()
        log_prior, clean = model(teacher_logits, queries)
        return log_prior, clean / model.clean_share

    def selection(
        self, teacher_logits: torch.Tensor, queries: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(log prior (N, K) at T = 1, P(not junk) (N,)) for the selection pass, on the logits' device."""
        if queries is None:
            return None, None
        if self.label_model == "fixed":
            return (query_log_prior(queries, teacher_logits.shape[1], self.rho), None) if self.rho else (None, None)
        model = self._annotators()
        where = model.bin_edges.device  # once per epoch: the pool's logits to the tables and back
        log_prior, clean = model(teacher_logits.to(where), queries.to(where))
        return log_prior.to(teacher_logits.device), clean.to(teacher_logits.device)

    def describe(self) -> str:
        """What the targets use ("" when nothing)."""
        if self.label_model == "annotators":
            if self.annotators is None:
                return "annotator model (fitted when training starts)"
            return self.annotators.describe()
        return f"query prior ρ={self.rho:g}" if self.rho else ""
