"""The ``kd3`` command line: one thin Typer command per stage, no logic of its own.

Flags override ``params.yaml``, and every stage takes ``--set KEY=VALUE`` for any key of its own
section (a YAML value; DVC does not see it); errors become exit codes: 2 for bad usage, params or input files
(the message names the file and key), 1 for a stage that ran and failed, 130 for Ctrl-C and 143
for SIGTERM (never 0, so DVC does not record an interrupted stage as done).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from pipeline.config import (
    CleanConfig,
    ConfigError,
    CrawlConfig,
    DistillConfig,
    EvaluateConfig,
    LabelConfig,
    ReportConfig,
    TeacherConfig,
    WorldConfig,
    build,
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
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="override KEY of this command's params section with a YAML value, e.g. --set kd3.tau=0.9 "
        "(repeatable; dvc repro does not see it)",
        show_default=False,
    ),
]
T = TypeVar("T")
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _in_params(key: str) -> str:
    """What ``--help`` shows as the default of a flag whose unset value is the params file's."""
    return f"{key} in the params file"


def _device_opt(section: str) -> Any:
    return typer.Option(help="auto, cpu or cuda", show_default=_in_params(f"{section}.device"))


def _progress_opt(section: str) -> Any:
    return typer.Option(
        "--progress/--no-progress", help="progress bars", show_default=_in_params(f"{section}.progress")
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kd3 {importlib.metadata.version('kd3')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print kd3's version and exit")
    ] = False,
) -> None:
    """Options before the command (``kd3 --version``); the app's help text stays the one given above."""


def _parse_sets(sets: list[str] | None, params: Path, section: str, cls: type) -> list[tuple[str, Any]]:
    """``KEY=VALUE`` pairs as (dotted key in ``section``, YAML value); a usage error exits 2 naming the pair.

    Warns that DVC does not see them: the outputs then differ from what the params file describes.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    out, full = [], []
    for item in sets or []:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not KEY.fullmatch(key):
            _fail(2, f"--set {item}: expected KEY=VALUE with KEY a dotted key of the {section} section")
        first, _, rest = key.partition(".")
        if first == section and rest and section not in fields:  # the params file's full path, as dvc -S takes it
            key = rest
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            _fail(2, f"--set {item}: not a YAML value ({str(e).splitlines()[0]})")
        out.append((key, value))
        full.append(f"{section}.{key}={text}")
    if out:
        typer.secho(
            f"warning: --set is not written to {params}, so DVC does not know about it: keep DVC in step with "
            f"`dvc exp run -S {' -S '.join(full)}`, or edit {params}",
            err=True,
            fg=typer.colors.YELLOW,
        )
    return out


def _section(
    params: Path, section: str, cls: type[T], sets: list[tuple[str, Any]], flags: dict[str, Any] | None = None
) -> T:
    """``load_section`` with the --set pairs applied first (a YAML null included), then the named flags."""
    if not sets:
        return load_section(params, section, cls, flags)
    raw = read_params(params).get(section) or {}
    if not isinstance(raw, dict):
        return load_section(params, section, cls)  # its error names the file and section
    raw = copy.deepcopy(raw)
    for dotted, value in [*sets, *((k, v) for k, v in (flags or {}).items() if v is not None)]:
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    return build(cls, raw, f"{params} with --set: {section}")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(code: int, message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _guarded(fn: Callable[[], T]) -> T:
    """Run a stage, mapping known failures to exit codes with a one-line message."""
    from crawl.classes import ClassFileError
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
    except (ValueError, OSError, RuntimeError) as e:
        # the stages' own errors derive from these: CrawlError, SourceError and StoreLockedError are
        # RuntimeErrors, DiskFullError an OSError, TeacherError and FeatureAccessError ValueErrors
        # (not imported here, so that a stage without the crawl's packages still reports its errors)
        _fail(1, str(e))
    raise AssertionError("unreachable")


@app.command()
def world(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Build the offline demo web (Fashion-MNIST rendered as web photos) into world.out_dir."""
    _setup_logging()
    from pipeline import world_stage

    sets = _parse_sets(set_, params, "world", WorldConfig)

    def go() -> Any:
        cfg = _section(params, "world", WorldConfig, sets)
        crawl_cfg = load_section(params, "crawl", CrawlConfig)
        return world_stage.run(cfg, crawl_cfg)

    _guarded(go)


@app.command()
def crawl(
    params: ParamsOpt = Path("params.yaml"),
    classes: Annotated[
        Path | None, typer.Option(help="class list, one name per line", show_default=_in_params("crawl.classes"))
    ] = None,
    engine: Annotated[
        list[str] | None,
        typer.Option("--engine", "-e", help="engine (repeatable)", show_default=_in_params("crawl.engines")),
    ] = None,
    per_class: Annotated[
        int | None, typer.Option(help="target images per class", show_default=_in_params("crawl.per_class"))
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder", show_default=_in_params("crawl.out_dir"))] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="i/n: crawl every n-th class starting at i", show_default=_in_params("crawl.shard")),
    ] = None,
    urls_file: Annotated[
        Path | None,
        typer.Option(help="TSV class<TAB>url for engine 'urls'", show_default=_in_params("crawl.urls_file")),
    ] = None,
    progress: Annotated[bool | None, _progress_opt("crawl")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="request again the URLs an earlier run gave up on")
    ] = False,
    set_: SetOpt = None,
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
    sets = _parse_sets(set_, params, "crawl", CrawlConfig)

    def go() -> Any:
        if per_class is not None:  # a small --per-class lowers the min_per_class floor with it
            floor = (read_params(params).get("crawl") or {}).get("min_per_class", CrawlConfig.min_per_class)
            if isinstance(floor, int) and floor > per_class:
                overrides["min_per_class"] = per_class
        return crawl_stage.run(_section(params, "crawl", CrawlConfig, sets, overrides), retry_failed=retry_failed)

    _guarded(go)


@app.command()
def clean(
    params: ParamsOpt = Path("params.yaml"),
    progress: Annotated[bool | None, _progress_opt("clean")] = None,
    set_: SetOpt = None,
) -> None:
    """Decode safely, filter, remove near-duplicates and pack the crawl into one training array."""
    _setup_logging()
    from pipeline import clean_stage

    sets = _parse_sets(set_, params, "clean", CleanConfig)

    def go() -> Any:
        cfg = _section(params, "clean", CleanConfig, sets, {"progress": progress})
        teacher_cfg = load_section(params, "teacher", TeacherConfig)
        return clean_stage.run(cfg, resolve_image_size(cfg, teacher_cfg.input_size, f"{params}: clean.image_size"))

    _guarded(go)


@app.command()
def teacher(
    params: ParamsOpt = Path("params.yaml"),
    checkpoint: Annotated[
        Path | None, typer.Option(help="your teacher checkpoint", show_default=_in_params("teacher.checkpoint"))
    ] = None,
    device: Annotated[str | None, _device_opt("teacher")] = None,
    set_: SetOpt = None,
) -> None:
    """Validate your teacher checkpoint (or train the demo teacher) and write the teacher record."""
    _setup_logging()
    from pipeline import teacher_stage

    overrides = {"checkpoint": str(checkpoint) if checkpoint else None, "device": device}
    sets = _parse_sets(set_, params, "teacher", TeacherConfig)
    _guarded(lambda: teacher_stage.run(_section(params, "teacher", TeacherConfig, sets, overrides)))


@app.command()
def label(
    params: ParamsOpt = Path("params.yaml"),
    device: Annotated[str | None, _device_opt("label")] = None,
    set_: SetOpt = None,
) -> None:
    """Pseudo-label every clean image with the teacher (float16 logits, confidence)."""
    _setup_logging()
    from pipeline import label_stage

    sets = _parse_sets(set_, params, "label", LabelConfig)
    _guarded(lambda: label_stage.run(_section(params, "label", LabelConfig, sets, {"device": device})))


@app.command()
def distill(
    params: ParamsOpt = Path("params.yaml"),
    method: Annotated[
        str | None, typer.Option(help="kd3, kd or dfnd", show_default=_in_params("distill.method"))
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="training epochs", show_default=_in_params("distill.epochs"))
    ] = None,
    device: Annotated[str | None, _device_opt("distill")] = None,
    set_: SetOpt = None,
) -> None:
    """Train the student on the clean web pool (KD3 by default); resumable; torchrun for multi-GPU."""
    _setup_logging()
    from pipeline import distill_stage

    overrides = {"method": method, "epochs": epochs, "device": device}
    sets = _parse_sets(set_, params, "distill", DistillConfig)
    _guarded(lambda: distill_stage.run(_section(params, "distill", DistillConfig, sets, overrides)))


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    device: Annotated[str | None, _device_opt("evaluate")] = None,
    set_: SetOpt = None,
) -> None:
    """Accuracy on a labelled set of the original distribution (metrics/ for dvc metrics show)."""
    _setup_logging()
    from pipeline import evaluate_stage

    sets = _parse_sets(set_, params, "evaluate", EvaluateConfig)
    _guarded(lambda: evaluate_stage.run(_section(params, "evaluate", EvaluateConfig, sets, {"device": device})))


@app.command()
def report(
    params: ParamsOpt = Path("params.yaml"),
    screenshot: Annotated[
        Path | None,
        typer.Option(help="also save a PNG of the page's top, taken with headless Chromium", show_default=False),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """One self-contained HTML page that tells the run's story (report.out_dir/index.html)."""
    _setup_logging()
    from pipeline import report_stage

    sets = _parse_sets(set_, params, "report", ReportConfig)

    def go() -> None:
        page = report_stage.run(_section(params, "report", ReportConfig, sets, {}), params)
        typer.echo(f"report: {page}")
        if screenshot is not None:
            report_stage.screenshot(page, screenshot)
            typer.echo(f"report: screenshot {screenshot}")

    _guarded(go)


@app.command()
def predict(
    path: Annotated[Path, typer.Argument(help="an image file, or a folder (searched recursively)", show_default=False)],
    student: Annotated[Path, typer.Option(help="the exported student's folder (kd3 distill)")] = Path("data/distill"),
    top_k: Annotated[int, typer.Option(min=1, help="classes per image, best first")] = 1,
    out: Annotated[
        Path | None, typer.Option(help="write a CSV here instead of tab-separated lines on stdout", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
) -> None:
    """Run the exported student on images: path, class and confidence per image (unreadable files are skipped)."""
    _setup_logging()
    from pipeline import predict as predict_mod

    if not path.exists():
        _fail(2, f"{path}: no such file or folder")
    _guarded(lambda: predict_mod.run(path, student, top_k=top_k, batch_size=batch_size, out=out))


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
