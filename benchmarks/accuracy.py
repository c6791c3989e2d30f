"""Student accuracy on the demo world: teacher, upper reference, KD / DFND / KD³ on web data, ablations.

Every row trains the same student with the same schedule and seeds through the real distill stage
(``pipeline.distill_stage.run``) and scores the exported TorchScript student. Settings are chosen on
the validation split (Fashion-MNIST test[0:2000]); the table reports the rest (test[2000:10000]).

- ``teacher``: the demo teacher itself.
- ``upper: KD on original data``: Hinton KD on Fashion-MNIST train[30000:60000] rendered as the
  teacher's own distribution (never seen by the teacher; ``--quick`` uses as many images as the web
  pool has, so only the distribution differs).
- ``KD (web)``, ``DFND (web)``, ``KD³ faithful (web)``: the methods as docs/method.md describes them.
- ``KD³ default``: ``params.yaml``'s ``distill:`` section as shipped (ours switched on where it helps).
- ``KD + query prior``: plain KD whose target is the teacher's softened posterior times the crawl
  query's prior (ours), to show how much of the default's gain that signal alone brings.
- ``KD³ −X``: the faithful KD³ with one component off.
- ``CE on crawl query``: no teacher: the student learns the crawl query (the webly supervised bar).
- ``+ annotators``: the KD target (and selection score) from the two-annotator model of teacher and
  query fitted on the pool (``label_model: annotators``) instead of the fixed prior.
- ``+ EMA``: the shipped student is the moving average of its weights (``ema_decay``).

Worlds (``--world``): ``demo`` is the pool ``make demo`` crawls; ``large`` the same kind of web with
1,000 images per class instead of 300. ``partial`` is a second web of the
same kind in which 45% of the photos sit on light backdrops the demo teacher never saw (it was
trained on dark ones): there the teacher collapses, calling most of them one class, while it still
transfers on the rest, so it is right on about a third of the in-class images and the crawl query
is the better label on much of the pool. The benchmark builds that world, crawls it from its
mirror, cleans and labels it with the demo teacher (``kd3 world/crawl/clean/label`` on a params
file under ``--work``) the first time, then trains every row on it.

Needs the demo teacher (``make demo`` or ``dvc repro teacher``), for ``--world demo`` the demo's clean
and label outputs, and Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
nothing leaves the machine.

    python benchmarks/accuracy.py --quick            # 2 cores, within 45 minutes
    python benchmarks/accuracy.py --epochs 60 --seeds 0 1 2 3 4    # a GPU
    python benchmarks/accuracy.py --quick --epochs 1 --seeds 0 --variants "KD (web)"   # a quick check
    python benchmarks/accuracy.py --quick --world partial --variants "CE on" "KD (web)" "KD +" "default"
    python benchmarks/accuracy.py --quick --study selection --seeds 0 1 2 3 4   # what selection does

``--study selection`` runs faithful KD³ variants of the selection instead (see ``STUDIES``).

The table goes to ``benchmarks/results/accuracy.md`` (``accuracy-partial.md`` for the partial world,
``accuracy-selection.md`` for the study;
on CUDA with ``-cuda`` added); a run of some rows only (``--variants``) goes under
``benchmarks/out/`` (``--out`` to change either).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import default_out, report, require  # noqa: E402

from demo.fashion_mnist import fashion_mnist_rgb32, load_fashion_mnist  # noqa: E402
from distill.data import resolve_device  # noqa: E402
from distill.export import load_exported  # noqa: E402
from distill.label import predict  # noqa: E402
from pipeline import distill_stage  # noqa: E402
from pipeline.artifacts.clean import CleanSet  # noqa: E402
from pipeline.artifacts.label import PseudoLabels  # noqa: E402
from pipeline.artifacts.teacher import TeacherRecord  # noqa: E402
from pipeline.artifacts.world import WorldTruth  # noqa: E402
from pipeline.config import DistillConfig, build, read_params  # noqa: E402

# KD³ as the paper describes it: every component on, every switch of ours off
FAITHFUL = {
    "kd3": {
        "selection": True,
        "shared_classifier": True,
        "feature_weighting": True,
        "mixdistribution": True,
        "kd_weight": 0.0,
        "query_prior": 0.0,
        "contrastive_head": "backbone",  # the released code's wiring
    }
}

# name -> overrides of the distill section (dotted keys); "default" is params.yaml as shipped
VARIANTS: dict[str, dict[str, Any]] = {
    "upper: KD on original data": {"method": "kd", "_original": True},
    "CE on crawl query (web, no teacher)": {"method": "query_ce"},
    "KD (web)": {"method": "kd", "kd": {"query_prior": 0.0}},
    "KD + query prior (web, ours)": {"method": "kd", "kd": {"query_prior": 0.7}},
    "DFND (web)": {"method": "dfnd"},
    "KD³ faithful (web)": {"method": "kd3", "kd3": FAITHFUL["kd3"]},
    "KD³ default (web)": {},
    "KD + annotators (web, ours)": {"method": "kd", "kd": {"query_prior": 0.0, "label_model": "annotators"}},
    "KD³ default + annotators (web, ours)": {"kd3": {"label_model": "annotators"}},
    "KD³ default + EMA 0.99 (web, ours)": {"ema_decay": 0.99},
    "KD³ −selection": {"method": "kd3", "kd3": {**FAITHFUL["kd3"], "selection": False}},
    "KD³ −shared classifier": {"method": "kd3", "kd3": {**FAITHFUL["kd3"], "shared_classifier": False}},
    "KD³ −feature weighting": {"method": "kd3", "kd3": {**FAITHFUL["kd3"], "feature_weighting": False}},
    "KD³ −MixDistribution": {"method": "kd3", "kd3": {**FAITHFUL["kd3"], "mixdistribution": False}},
}


# --study selection: does KD³'s dynamic selection help on web data, and which part of it? Every row is
# faithful KD³ with the released head wiring and epoch_size: pool, so a selection that keeps fewer
# images still trains the same number of steps (the images seen are held equal). "oracle" trains
# without selection on the pool minus the images the demo world knows are junk: the best a
# selection that only drops junk could do.
STUDY_BASE = {"epoch_size": "pool", "kd3": FAITHFUL["kd3"]}
STUDIES: dict[str, dict[str, dict[str, Any]]] = {
    "selection": {
        "no selection": {"kd3": {"selection": False}},
        "selection, α scaled (faithful)": {},
        "selection, α released": {"kd3": {"alpha_schedule": "released"}},
        "selection, α = 1 (the teacher decides)": {"kd3": {"alpha_schedule": "teacher"}},
        "selection, fixed τ = 0.5": {"kd3": {"adaptive_thresholds": False, "tau": 0.5}},
        "selection, fixed τ = 0.8": {"kd3": {"adaptive_thresholds": False, "tau": 0.8}},
        "selection, fixed τ = 0.95": {"kd3": {"adaptive_thresholds": False, "tau": 0.95}},
        "oracle: no selection, true junk removed": {"kd3": {"selection": False}, "_oracle": True},
    }
}

# --world: overrides of params.yaml's world section ("demo" is the file as shipped)
WORLDS: dict[str, dict[str, Any]] = {
    "demo": {},
    "partial": {"world": {"seed": 7, "render": {"light_bg_prob": 0.45, "dark_bg_prob": 0.45}}},
    # the demo's kind of web, 3.3x the pool: 1,000 images per class crawled from lists of 1,400
    "large": {"world": {"seed": 11, "results_per_class": 1400}, "crawl": {"per_class": 1000}},
}


def build_world_pool(world: str, params_path: str, work: Path) -> dict[str, Any]:
    """Run world -> crawl -> clean -> label for ``world`` under ``work`` with the demo teacher (once);
    returns the params it ran with, whose distill section points at that pool."""
    params = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))
    root = (work / f"world-{world}").resolve()

    def relocate(node: Any) -> Any:  # every data/ path but the teacher's moves under root
        if isinstance(node, dict):
            return {k: relocate(v) for k, v in node.items()}
        if isinstance(node, str) and node.startswith("data/") and not node.startswith("data/teacher"):
            return str(root / node[len("data/") :])
        return node

    params = merge(relocate(params), WORLDS[world])
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    if not (Path(params["label"]["out_dir"]) / "logits.npy").is_file():
        for stage in ("world", "crawl", "clean", "label"):
            print(f"world {world}: kd3 {stage}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-c", "from pipeline.cli import app; app()", stage, "--params", str(path)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"world {world}: kd3 {stage} failed:\n{done.stderr[-3000:]}")
    return params


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def made_from(label_dir: Path, source: dict[str, Any]) -> bool:
    """Whether the pool whose labels are in ``label_dir`` was made from ``source`` (its report holds
    each of those values), so that it can be reused."""
    report = label_dir / "report.json"
    return report.is_file() and all(json.loads(report.read_text()).get(k) == v for k, v in source.items())


def original_pool(work: Path, n: int | None, teacher_dir: str, device: torch.device) -> tuple[str, str]:
    """A clean/label pair made of Fashion-MNIST train[30000:60000] in the teacher's own rendering."""
    clean, label = work / "orig_clean", work / "orig_label"
    record = TeacherRecord.load(teacher_dir)
    source = {"teacher_sha256": record.sha256, "n": n}
    if made_from(label, source):
        return str(clean), str(label)
    source = (record.demo or {}).get("settings", {}).get("source", "/usr/share/datasets/fashion-mnist")
    raw, _ = load_fashion_mnist(source, "train")
    images = fashion_mnist_rgb32(raw[30000 : 30000 + n if n else 60000])
    clean.mkdir(parents=True, exist_ok=True)
    np.save(clean / "images.npy", images)
    keys = [hashlib.sha256(im.tobytes() + i.to_bytes(4, "little")).hexdigest() for i, im in enumerate(images)]
    # no crawl query: class_index -1, so a query prior has nothing to say about these images
    kept = [{"sha256": k, "path": "", "class_name": "", "class_index": -1} for k in keys]
    CleanSet.save_index(clean, kept, {"kept": len(kept)}, record.classes)
    teacher = record.load_teacher().to(device)
    logits = predict(
        teacher, images, input_size=record.input_size, in_chans=record.in_chans, batch_size=512, device=device
    )
    PseudoLabels.save(label, logits, {**source, "images_fingerprint": CleanSet.load(clean).fingerprint})
    return str(clean), str(label)


def oracle_pool(work: Path, clean_dir: str, label_dir: str, teacher_dir: str, truth: str) -> tuple[str, str]:
    """The clean/label pair without the images the world's truth calls junk (demo only: an oracle)."""
    out_clean, out_label = work / "oracle_clean", work / "oracle_label"
    record = TeacherRecord.load(teacher_dir)
    clean = CleanSet.load(clean_dir)
    labels = PseudoLabels.load(label_dir, clean, record)
    source = {"oracle_of": clean.fingerprint, "teacher_sha256": record.sha256}
    if made_from(out_label, source):
        return str(out_clean), str(out_label)
    keep = np.flatnonzero(WorldTruth.load(truth).labels(clean.keys, record.classes) >= 0)
    out_clean.mkdir(parents=True, exist_ok=True)
    np.save(out_clean / "images.npy", np.asarray(clean.images[keep]))
    kept = [dataclasses.asdict(clean.kept[i]) for i in keep]
    CleanSet.save_index(out_clean, kept, {"kept": len(kept), "oracle_of": clean_dir}, record.classes)
    report = {**source, "images_fingerprint": CleanSet.load(out_clean).fingerprint}
    PseudoLabels.save(out_label, labels.logits[keep], report)
    return str(out_clean), str(out_label)


def inputs_fingerprint(clean_dir: str, label_dir: str) -> str:
    """What a run's result depends on besides its settings: the pool's images and teacher logits, and
    the code of the distill stage (the ``.py`` files dvc.yaml lists as its deps). A run is reused only
    when all of it is unchanged, the same rule by which DVC would not rerun the stage."""
    h = hashlib.sha256()
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["distill"]
    for dep in sorted(d for d in stage["deps"] if d.endswith(".py")):
        h.update(dep.encode() + b"\0" + (REPO / dep).read_bytes())
    h.update(CleanSet.load(clean_dir).fingerprint.encode())
    h.update((Path(label_dir) / "logits.npy").read_bytes())
    return h.hexdigest()


def train_one(raw: dict[str, Any], threads: int) -> tuple[Path, float]:
    """One distill run in a worker process; seconds, or -1 when its exported student already existed."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    out = Path(raw["out_dir"])
    t0 = time.time()
    if (out / "student.json").is_file():
        return out, -1.0  # reused from an earlier invocation (same settings, seed, pool and code)
    shutil.rmtree(out, ignore_errors=True)
    distill_stage.run(build(DistillConfig, raw, "distill"))
    return out, time.time() - t0


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray, size: int, chans: int) -> float:
    pred = predict(model, images, input_size=size, in_chans=chans, batch_size=512, device=torch.device("cpu"))
    return float((pred.argmax(1) == labels).mean())


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--quick", action="store_true", help="2-core settings: an upper reference as large as the web pool")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=None, help="substrings of row names to run (default: all)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON", help="extra overrides for every web row")
    ap.add_argument("--work", default="benchmarks/out/accuracy")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/accuracy.md")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with cores/jobs threads)")
    ap.add_argument("--world", choices=list(WORLDS), default="demo", help="the web pool every row trains on")
    ap.add_argument("--study", choices=list(STUDIES), default=None, help="a study's rows instead of the table's")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    epochs = args.epochs
    work = Path(args.work)  # created once the inputs are known to exist
    if args.world == "demo":
        base = read_params(args.params).get("distill", {})
    else:
        require(Path(read_params(args.params)["teacher"]["out_dir"]) / TeacherRecord.FILE, "the demo teacher's record")
        base = build_world_pool(args.world, args.params, work)["distill"]
    base = merge(base, {"device": args.device, "eval": {"last": 2000}})
    if epochs:
        base["epochs"] = epochs
    for item in args.set:
        key, value = item.split("=", 1)
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = json.loads(value)
    teacher_dir = base.get("teacher_dir", "data/teacher")
    require(Path(teacher_dir) / TeacherRecord.FILE, "the demo teacher's record")
    require(Path(base.get("clean_dir", "data/clean")) / "images.npy", "the clean stage's images")
    require(Path(base.get("label_dir", "data/label")) / "logits.npy", "the label stage's teacher logits")
    require(
        base["eval"].get("fashion_mnist") or "distill.eval.fashion_mnist (unset)",
        "Fashion-MNIST, the evaluation set",
        "install Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`)",
    )
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    record = TeacherRecord.load(teacher_dir)
    teacher = record.load_teacher()
    size, chans = record.input_size, record.in_chans
    raw, labels = load_fashion_mnist(base["eval"]["fashion_mnist"], "test")
    test_x = fashion_mnist_rgb32(raw)
    val = (test_x[:2000], labels[:2000])
    test = (test_x[2000:], labels[2000:])
    pool_n = len(np.load(Path(base.get("clean_dir", "data/clean")) / "images.npy", mmap_mode="r"))

    rows: dict[str, dict[str, list[float]]] = {}
    teacher.eval()
    rows["teacher"] = {
        "val": [accuracy(teacher, *val, size, chans)],
        "test": [accuracy(teacher, *test, size, chans)],
        "seconds": [0.0],
    }
    variants = VARIANTS
    if args.study:
        variants = {name: merge(STUDY_BASE, over) for name, over in STUDIES[args.study].items()}
    names = [n for n in variants if not args.variants or any(v in n for v in args.variants)]
    t_all = time.time()
    tasks = []
    fingerprints: dict[tuple[str, str], str] = {}
    for name in names:
        over = dict(variants[name])
        cfg_raw = merge(base, {k: v for k, v in over.items() if not k.startswith("_")})
        if over.get("_oracle"):
            if not base.get("truth"):
                sys.exit("the oracle row needs the world's truth (distill.truth in the params file)")
            clean, label = oracle_pool(work, base["clean_dir"], base["label_dir"], base["teacher_dir"], base["truth"])
            cfg_raw = merge(cfg_raw, {"clean_dir": clean, "label_dir": label})
        if over.get("_original"):
            teacher_dir = cfg_raw.get("teacher_dir", "data/teacher")
            clean, label = original_pool(work, pool_n if args.quick else None, teacher_dir, device)
            cfg_raw = merge(cfg_raw, {"clean_dir": clean, "label_dir": label, "truth": None, "holdout": 0.0})
        rows[name] = {"val": [], "test": [], "seconds": []}
        pool = (cfg_raw.get("clean_dir", "data/clean"), cfg_raw.get("label_dir", "data/label"))
        if pool not in fingerprints:
            fingerprints[pool] = inputs_fingerprint(*pool)
        inputs = fingerprints[pool]
        for seed in args.seeds:
            key = json.dumps([cfg_raw, seed, args.world, inputs], sort_keys=True)
            slug = hashlib.sha256(key.encode()).hexdigest()[:12]
            out = work / "runs" / slug
            tasks.append(
                (name, seed, merge(cfg_raw, {"seed": seed, "out_dir": str(out), "metrics_dir": str(out / "metrics")}))
            )
    threads = max(1, torch.get_num_threads() // args.jobs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futures = {ex.submit(train_one, cfg, threads): (name, seed) for name, seed, cfg in tasks}
        for fut in as_completed(futures):
            name, seed = futures[fut]
            try:
                out, seconds = fut.result()
            except Exception:  # stop now, not after every other run: cancel what has not started
                for other in futures:
                    other.cancel()
                print(f"{name} seed {seed} failed; waiting for the runs already started", file=sys.stderr, flush=True)
                raise
            model, _ = load_exported(out)
            res = rows[name]
            res["val"].append(accuracy(model, *val, size, chans))
            res["test"].append(accuracy(model, *test, size, chans))
            res["seconds"].append(seconds)
            print(
                f"{name} seed {seed}: val {res['val'][-1]:.4f} test {res['test'][-1]:.4f} ({seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    reused = sum(1 for r in rows.values() for x in r["seconds"] if x < 0)
    lines = [
        "| method | validation acc. % (test[0:2000]) | test acc. % (test[2000:10000]) | seeds |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {fmt(r['val'])} | {fmt(r['test'])} | {len(r['test'])} |")
    summary = []
    kd, up = rows.get("KD (web)"), rows.get("upper: KD on original data")
    for name in ("KD³ default (web)", "KD³ faithful (web)", "DFND (web)"):
        if kd and up and name in rows and rows[name]["test"]:
            lo, hi, got = (statistics.mean(x["test"]) for x in (kd, up, rows[name]))
            if got >= lo:
                closed = 100 * (got - lo) / (hi - lo)
                summary.append(
                    f"- {name}: closes {closed:.0f}% of the gap from KD (web) to the upper "
                    f"reference ({100 * lo:.1f} → {100 * hi:.1f})."
                )
            else:
                summary.append(f"- {name}: {100 * (lo - got):.1f} points below KD (web) ({100 * lo:.1f}).")
    settings = (
        f"Student `{base['student']}`, {base['epochs']} epochs, batch {base['batch_size']}, lr {base['lr']} "
        f"({base['lr_schedule']}), seeds {args.seeds}, device {device}; web pool {pool_n} images; "
        f"{args.jobs} runs in parallel; wall {time.time() - t_all:.0f} s"
        + (f" ({reused} of {len(tasks)} runs reused from an earlier call)." if reused else ".")
    )
    label_report = Path(base.get("label_dir", "data/label")) / "report.json"
    if label_report.is_file():  # how the teacher sees this pool, from the label stage (demo truth: a report only)
        lab = json.loads(label_report.read_text(encoding="utf-8"))
        truth, top = lab.get("demo_truth") or {}, max(lab["per_class"].items(), key=lambda kv: kv[1])
        settings += (
            f" The teacher on this pool: right on {100 * truth.get('in_class_accuracy', float('nan')):.1f}% of the "
            f"in-class images, calls {100 * top[1] / lab['images']:.1f}% of the pool {top[0]!r}, agrees with the "
            f"crawl query on {100 * lab['transfer']['agreement']:.1f}% (kappa {lab['transfer']['kappa']:.2f})."
        )
    text = "\n\n".join(part for part in ("\n".join(lines), "\n".join(summary), settings) if part)
    out = args.out or default_out(__file__, keep=not args.variants, device=device.type)
    for tag in ([args.world] if args.world != "demo" else []) + ([args.study] if args.study else []):
        if not args.out:
            out = out.with_name(out.name.replace("accuracy", f"accuracy-{tag}", 1))
    title = {"demo": "the demo world", "partial": "the partial-transfer world", "large": "the large-pool world"}[
        args.world
    ]
    report(out, f"Student accuracy on {title}", text, str(device))


if __name__ == "__main__":
    main()
