"""What every benchmark shares: its inputs checked up front, and its table written with the machine it ran on.

A speed figure means nothing without the machine that printed it, so every results file starts
with the command, the CPU count and model, the torch version and the device. Tables worth keeping
go to ``benchmarks/results/<script>.md`` (``<script>-cuda.md`` from a GPU); toy-size runs go to the
git-ignored ``benchmarks/out/``.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

from kd3util import write_text

RESULTS = Path("benchmarks/results")
SCRATCH = Path("benchmarks/out")
DEMO_HINT = "run `make demo` (offline, about 8 minutes on 2 cores) from the repository root first"


def require(path: str | Path, what: str, hint: str = DEMO_HINT) -> None:
    """Stop with one line naming the missing input and how to get it, instead of a traceback later."""
    if not Path(path).exists():
        sys.exit(f"{path}: missing ({what}); {hint}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> str:
    """One line: OS, CPU count and model, torch version, device (torch is not imported for this), and the
    load average, since other processes on a shared machine slow every figure down."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    load = f", 1-minute load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}), "
        f"Python {platform.python_version()}, torch {torch_version}, device {device}{load}"
    )


def default_out(script: str, keep: bool = True, device: str = "cpu") -> Path:
    """``benchmarks/results/<stem>.md`` for a run worth keeping, ``benchmarks/out/<stem>.md`` for a toy one;
    ``<stem>-cuda.md`` for a run on a GPU, so that it does not replace the CPU figures."""
    suffix = "" if device == "cpu" else f"-{device}"
    return (RESULTS if keep else SCRATCH) / f"{Path(script).stem}{suffix}.md"


def report(out: str | Path, title: str, body: str, device: str) -> str:
    """Print the table with its header and write the same text to ``out`` atomically; returns the text."""
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    text = f"# {title}\n\nPrinted by `{command}` on {machine(device)}.\n\n{body.strip()}\n"
    print(text, flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    print(f"written to {out}", file=sys.stderr)
    return text
