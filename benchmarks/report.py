"""Results as markdown, and ``--readme``: each benchmark's tables written into its own block of README.md.

A block is the text between two marker lines, one pair per benchmark::

    <!-- benchmarks:models -->
    ...written by `python -m benchmarks models --readme README.md`; replaced on every such run...
    <!-- /benchmarks:models -->

Everything outside the markers is left as it is, so the prose around a table stays hand-written. The block says
the exact command, when it ran and on what machine (CPU model, cores, memory, accelerator, library versions), since
only same-run ratios mean anything and the reader must know which run a table came from. The file is replaced
atomically (temp file + rename): a crash or a failed run never leaves a half-written README, and a run that fails
before its tables are complete writes nothing.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from pathlib import Path


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_summary() -> str:
    """One line: CPU model, usable cores, memory, JAX's device, and the versions that decide the numbers."""
    import jax

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = _memory_gib()
    dev = jax.devices()[0]
    accel = "no accelerator" if dev.platform == "cpu" else f"{jax.device_count()}x {dev.device_kind}"
    parts = [f"{_cpu_model()} ({platform.machine()}), {cores} cores" + (f", {mem:.0f} GiB" if mem else ""), accel,
             f"Python {platform.python_version()}",
             ", ".join(f"{d} {_version(d)}" for d in ("jax", "jaxlib", "flax", "torch", "timm")),
             f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"]
    return "; ".join(parts)


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it again (``python -m benchmarks ...``)."""
    argv = sys.argv[1:] if argv is None else argv
    return "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in argv)


def markers(section: str) -> tuple[str, str]:
    """The begin and end marker lines of ``section``'s block."""
    return f"<!-- benchmarks:{section} -->", f"<!-- /benchmarks:{section} -->"


def find_block(text: str, section: str, path: str | os.PathLike = "README") -> tuple[int, int]:
    """Line numbers of ``section``'s begin and end markers in ``text``.

    Raises:
        ValueError: the markers are missing, repeated or out of order.
    """
    begin, end = markers(section)
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(
            f"{path}: expected one '{begin}' line and, after it, one '{end}' line (found {len(starts)} and "
            f"{len(ends)}); put that pair where the {section} tables belong and run again. Nothing was written.")
    return starts[0], ends[0]


def render_block(command: str, started: datetime.datetime, finished: datetime.datetime,
                 machine: str, body: list[str]) -> str:
    """The block's text between (not including) its markers."""
    fmt = "%Y-%m-%d %H:%M"
    when = f"{started.strftime(fmt)}-{finished.strftime('%H:%M' if finished.date() == started.date() else fmt)} UTC"
    head = (f"_Written by `{command}` ({when}), on: {machine}. Re-run the command to replace this block; "
            f"edits inside it are overwritten._")
    return "\n\n".join([head, *body])


def update_readme(path: str | os.PathLike, section: str, block: str) -> None:
    """Replace the text between ``section``'s markers in ``path`` with ``block``, atomically.

    Raises:
        ValueError: the file lacks the markers, holds them more than once or out of order (nothing is written).
    """
    from volo_jax.checkpoint import write_atomic

    text = Path(path).read_text()
    start, end = find_block(text, section, path)
    lines = text.split("\n")
    write_atomic(path, "\n".join(lines[:start + 1] + ["", block, ""] + lines[end:]))


class Recorder:
    """Collects a run's markdown (tables and notes) while the benchmark prints as it goes."""

    def __init__(self) -> None:
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.parts: list[str] = []

    def table(self, cols: list[str], rows: list[list[str]], title: str | None = None) -> None:
        md = markdown_table(cols, rows)
        print()
        if title:
            print(title)
        print(md, flush=True)
        self.parts.append(f"{title}\n\n{md}" if title else md)

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text)

    def write(self, readme: str | os.PathLike, section: str, command: str | None = None) -> None:
        """Write what was recorded into ``readme``'s ``section`` block (see :func:`update_readme`)."""
        finished = datetime.datetime.now(datetime.timezone.utc)
        block = render_block(command or command_line(), self.started, finished, machine_summary(),
                             self.parts)
        update_readme(readme, section, block)
        print(f"wrote the {section} tables into {readme}", flush=True)
