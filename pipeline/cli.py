"""The ``kd3`` command line: one thin Typer command per stage, no logic of its own.

Flags override ``params.yaml``; errors become exit codes: 2 for bad usage, params or input files
(the message names the file and key), 1 for a stage that ran and failed, 130 for Ctrl-C and 143
for SIGTERM (never 0, so DVC does not record an interrupted stage as done).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.config import (
    CleanConfig,
    ConfigError,
    CrawlConfig,
    DistillConfig,
    EvaluateConfig,
    LabelConfig,
    TeacherConfig,
    WorldConfig,
    check_params,
    load_section,
    read_params,
    resolve_image_size,
)

app = typer.Typer(
    name="kd3",
    help="Distil a private teacher into a small student using only web-crawled images (KD3, ICCV 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
mirror_app = typer.Typer(help="The offline web: serve a demo world over loopback HTTP.", no_args_is_help=True)
app.add_typer(mirror_app, name="mirror")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]
T = TypeVar("T")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(code: int, message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _guarded(fn: Callable[[], T]) -> T:
    """Run a stage, mapping known failures to exit codes with a one-line message."""
    from crawl.classes import ClassFileError
    from crawl.crawler import CrawlError
    from crawl.sources import SourceError
    from crawl.store import DiskFullError, StoreLockedError
    from kd3util import Terminated

    try:
        return fn()
    except (ConfigError, ClassFileError) as e:
        _fail(2, str(e))
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None)  # distill.trainer.TrainingInterrupted
        if signum is not None:
            typer.secho(f"interrupted ({e}): checkpoint saved; rerun to resume", err=True)
            raise typer.Exit(128 + signum) from None
        if isinstance(e, Terminated):
            typer.secho("terminated (SIGTERM): completed work is kept; rerun to resume", err=True)
            raise typer.Exit(143) from None
        typer.secho("interrupted: completed work is kept; rerun to resume", err=True)
        raise typer.Exit(130) from None
    except (
        CrawlError,
        SourceError,
        StoreLockedError,
        DiskFullError,
        FileNotFoundError,
        PermissionError,
        ValueError,
        OSError,
        RuntimeError,
    ) as e:  # TeacherError and FeatureAccessError are ValueErrors
        _fail(1, str(e))
    raise AssertionError("unreachable")


@app.command()
def world(params: ParamsOpt = Path("params.yaml")) -> None:
    """Build the offline demo web (Fashion-MNIST rendered as web photos) into world.out_dir."""
    _setup_logging()
    from pipeline import world_stage

    def go() -> Any:
        cfg = load_section(params, "world", WorldConfig)
        crawl_cfg = load_section(params, "crawl", CrawlConfig)
        return world_stage.run(cfg, crawl_cfg)

    _guarded(go)


@app.command()
def crawl(
    params: ParamsOpt = Path("params.yaml"),
    classes: Annotated[Path | None, typer.Option(help="class list, one name per line")] = None,
    engine: Annotated[list[str] | None, typer.Option("--engine", "-e", help="engine (repeatable)")] = None,
    per_class: Annotated[int | None, typer.Option(help="target images per class")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    shard: Annotated[str | None, typer.Option(help="i/n: crawl every n-th class starting at i")] = None,
    urls_file: Annotated[Path | None, typer.Option(help="TSV class<TAB>url for engine 'urls'")] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="progress bars")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="request again the URLs an earlier run gave up on")
    ] = False,
) -> None:
    """Search the web by class name and download images with full provenance (resumable)."""
    _setup_logging()
    from pipeline import crawl_stage

    overrides = {
        "classes": str(classes) if classes else None,
        "engines": engine or None,
        "per_class": per_class,
        "out_dir": str(out) if out else None,
        "shard": shard,
        "urls_file": str(urls_file) if urls_file else None,
        "progress": progress,
    }
    if per_class is not None and per_class < 1:
        _fail(2, f"--per-class: expected an integer >= 1, got {per_class}")

    def go() -> Any:
        if per_class is not None:  # a small --per-class lowers the min_per_class floor with it
            floor = (read_params(params).get("crawl") or {}).get("min_per_class", CrawlConfig.min_per_class)
            if isinstance(floor, int) and floor > per_class:
                overrides["min_per_class"] = per_class
        return crawl_stage.run(load_section(params, "crawl", CrawlConfig, overrides), retry_failed=retry_failed)

    _guarded(go)


@app.command()
def clean(params: ParamsOpt = Path("params.yaml")) -> None:
    """Decode safely, filter, remove near-duplicates and pack the crawl into one training array."""
    _setup_logging()
    from pipeline import clean_stage

    def go() -> Any:
        cfg = load_section(params, "clean", CleanConfig)
        teacher_cfg = load_section(params, "teacher", TeacherConfig)
        return clean_stage.run(cfg, resolve_image_size(cfg, teacher_cfg.input_size, f"{params}: clean.image_size"))

    _guarded(go)


@app.command()
def teacher(
    params: ParamsOpt = Path("params.yaml"),
    checkpoint: Annotated[
        Path | None, typer.Option(help="your teacher checkpoint (overrides teacher.checkpoint)")
    ] = None,
) -> None:
    """Validate your teacher checkpoint (or train the demo teacher) and write the teacher record."""
    _setup_logging()
    from pipeline import teacher_stage

    overrides = {"checkpoint": str(checkpoint) if checkpoint else None}
    _guarded(lambda: teacher_stage.run(load_section(params, "teacher", TeacherConfig, overrides)))


@app.command()
def label(params: ParamsOpt = Path("params.yaml")) -> None:
    """Pseudo-label every clean image with the teacher (float16 logits, confidence)."""
    _setup_logging()
    from pipeline import label_stage

    _guarded(lambda: label_stage.run(load_section(params, "label", LabelConfig)))


@app.command()
def distill(
    params: ParamsOpt = Path("params.yaml"),
    method: Annotated[str | None, typer.Option(help="kd3, kd or dfnd (overrides distill.method)")] = None,
    epochs: Annotated[int | None, typer.Option(help="overrides distill.epochs")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (overrides distill.device)")] = None,
) -> None:
    """Train the student on the clean web pool (KD3 by default); resumable; torchrun for multi-GPU."""
    _setup_logging()
    from pipeline import distill_stage

    overrides = {"method": method, "epochs": epochs, "device": device}
    _guarded(lambda: distill_stage.run(load_section(params, "distill", DistillConfig, overrides)))


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Accuracy on a labelled set of the original distribution (metrics/ for dvc metrics show)."""
    _setup_logging()
    from pipeline import evaluate_stage

    _guarded(lambda: evaluate_stage.run(load_section(params, "evaluate", EvaluateConfig)))


@app.command()
def check(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate every section of the params file and the files it names (runs nothing).

    Run it before ``dvc repro``: DVC parses params.yaml itself, without kd3's limits.
    """

    def go() -> None:
        for note in check_params(params):
            typer.echo(f"{params}: {note}")

    _guarded(go)


@app.command()
def init(
    checkpoint: Annotated[Path, typer.Option(help="your teacher checkpoint (state dict, safetensors or TorchScript)")],
    classes: Annotated[Path, typer.Option(help="your class file, one name per line in the teacher's output order")],
    urls: Annotated[Path | None, typer.Option(help="a TSV of class<TAB>url to crawl (engine urls)")] = None,
    engine: Annotated[list[str] | None, typer.Option("--engine", "-e", help="search engine (repeatable)")] = None,
    arch: Annotated[str | None, typer.Option(help="architecture, when its keys do not tell")] = None,
    input_size: Annotated[int | None, typer.Option(help="the side the teacher was trained at")] = None,
    eval_dir: Annotated[Path | None, typer.Option(help="labelled images, one sub-folder per class")] = None,
    allow_private: Annotated[bool, typer.Option(help="let the crawl reach private/loopback servers")] = False,
    template: Annotated[Path, typer.Option(help="params file to start from")] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="params file to write")] = Path("params.yaml"),
    force: Annotated[bool, typer.Option(help="overwrite --out if it exists")] = False,
) -> None:
    """Write a params file for your own teacher, class file and URL list or engines (runs nothing)."""
    _setup_logging()
    from pipeline.init_params import init_params, write_params

    if out.exists() and not force:  # the default --out is the demo's params.yaml: never lose it by accident
        _fail(2, f"{out}: exists; pass --force to overwrite it, or --out another file")

    def go() -> Any:
        params, report = init_params(
            template,
            checkpoint,
            classes,
            urls=urls,
            engines=engine,
            arch=arch,
            input_size=input_size,
            eval_dir=eval_dir,
            allow_private=allow_private,
        )
        write_params(params, out, report)
        for line in report.filled:
            typer.echo(f"filled   {line}", err=True)
        for line in report.assumed:
            typer.echo(f"assumed  {line}", err=True)
        for line in report.unknown:
            typer.echo(f"set it   {line}", err=True)
        typer.echo(
            f"wrote {out}; next: kd3 crawl --params {out}, look at data/crawl, then dvc repro "
            "(which reads params.yaml)",
            err=True,
        )

    _guarded(go)


@mirror_app.command("serve")
def mirror_serve(
    world_dir: Annotated[Path, typer.Option("--world", help="world folder (kd3 world)")] = Path("data/world"),
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port; 0 picks a free one")] = 0,
    log: Annotated[Path | None, typer.Option(help="append every request as JSON to this file")] = None,
    delay: Annotated[float, typer.Option(help="added latency per image response, seconds")] = 0.0,
) -> None:
    """Serve a world: Bing-format search pages at /images/async and the images at /img/."""
    from demo.mirror import MirrorServer

    try:
        server = MirrorServer(world_dir, host, port, log, delay_s=delay)
    except (FileNotFoundError, OSError) as e:
        _fail(2 if isinstance(e, FileNotFoundError) else 1, str(e))
        return
    typer.echo(f"serving {world_dir} at {server.base_url}  (search: {server.base_url}/images/async?q=...)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    app()
