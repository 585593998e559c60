"""Shared plumbing of the experiment scripts: arguments, environment header, tables, figures.

Not part of the package (the package never imports experiments). Each script puts this
directory on ``sys.path`` by being run as ``python experiments/<name>.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MAX_PNG_BYTES = 300_000


def parse_args(description: str, replot: bool = False) -> argparse.Namespace:
    """``--smoke`` (tiny budget, seconds), ``--out`` (results directory), ``--seed``, and
    optionally ``--replot`` (rebuild the .md/.png from the .json of an earlier run)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budget (seconds): checks that the script runs end to end")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"directory of the .md/.png/.json results (default {RESULTS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every fit and diagnosis")
    if replot:
        parser.add_argument("--replot", action="store_true",
                            help="no fitting: rebuild the .md and .png from the .json in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def setup() -> None:
    """One thread (the machine's cores are shared) and a non-interactive matplotlib."""
    torch.set_num_threads(1)
    os.environ.setdefault("MPLBACKEND", "Agg")


def environment(smoke: bool, seconds: float | None = None) -> str:
    """Markdown lines: date, machine, versions, run mode and wall time."""
    import krflows

    cpu = platform.processor() or platform.machine()
    lines = [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {platform.system()} {platform.machine()} ({cpu}), "
        f"{os.cpu_count()} CPU cores shared with other jobs, torch threads = {torch.get_num_threads()}",
        f"- versions: python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"krflows {krflows.__version__}",
        f"- run: {'SMOKE (tiny budget, numbers meaningless)' if smoke else 'full'}",
    ]
    if seconds is not None:
        lines.append(f"- wall time: {seconds:.0f} s")
    return "\n".join(lines)


def fmt(v, digits: int = 3) -> str:
    """A compact number: ``nan``/``inf`` spelled out, small and large values in e-notation."""
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(t, digits) for t in v) + "]"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "−inf"
    if v != 0 and (abs(v) < 10 ** -(digits - 1) or abs(v) >= 10 ** (digits + 2)):
        return f"{v:.{max(digits - 1, 1)}e}"
    if abs(v) >= 10**digits:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.{digits}g}"
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"


def md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; cells are formatted with :func:`fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Saves a PNG, lowering the resolution until it is below ``MAX_PNG_BYTES``."""
    import matplotlib.pyplot as plt

    while True:
        fig.savefig(path, dpi=dpi)
        if path.stat().st_size < MAX_PNG_BYTES or dpi <= 50:
            break
        dpi = int(dpi * 0.8)
    plt.close(fig)


def load_json(path: Path):
    """Reads :func:`save_json`'s output back ("inf", "-inf", "nan" strings become floats)."""

    def restore(v):
        if isinstance(v, dict):
            return {k: restore(x) for k, x in v.items()}
        if isinstance(v, list):
            return [restore(x) for x in v]
        if v in ("inf", "-inf", "nan"):
            return float(v)
        return v

    return restore(json.loads(path.read_text()))


def save_json(obj, path: Path) -> None:
    """Strict JSON (non-finite floats as strings) of the raw numbers behind a table."""

    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v

    path.write_text(json.dumps(clean(obj), indent=1, allow_nan=False) + "\n")


MAX_NOTEBOOK_BYTES = 1_000_000


def write_notebook(cells: list[tuple[str, str]], path: Path, argv: Sequence[str] | None = None) -> None:
    """Writes ``notebooks/*.ipynb`` from ``("md" | "code", source)`` cells (the builders), then
    executes it top to bottom and saves it **with its outputs** (what a reader on the web sees;
    CI re-executes it with a smaller budget). ``--no-execute`` in ``argv`` (default
    ``sys.argv``) writes it without outputs."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    argv = sys.argv[1:] if argv is None else argv
    nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                             for kind, src in cells])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)
    print(f"wrote {path}")
    if "--no-execute" not in argv:
        execute_notebook(path)


def execute_notebook(path: Path, timeout: int = 900) -> float:
    """Executes the notebook at ``path`` in place (nbclient, as ``tests/test_notebooks.py``
    does; the working directory is a temporary one, the figures inline PNGs), strips the
    per-cell timing metadata, checks the size (< :data:`MAX_NOTEBOOK_BYTES`) and returns the
    wall time. The kernel inherits this process's environment (``PYTHONPATH``, and
    ``KRFLOWS_NOTEBOOK_STEPS`` if set: leave it unset for the committed outputs)."""
    import tempfile
    import time

    import nbformat
    from nbclient import NotebookClient

    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": cwd}}).execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    size = Path(path).stat().st_size
    print(f"executed {path} in {seconds:.0f} s ({size / 1e3:.0f} kB)")
    if size > MAX_NOTEBOOK_BYTES:
        raise SystemExit(f"{path} is {size} bytes, above {MAX_NOTEBOOK_BYTES}: shrink its figures")
    return seconds
