"""XLA compiler options for our jitted programs, per backend: ``jax.jit(fn, compiler_options=compiler_options())``.

On XLA:CPU the default HLO scheduler (``CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED`` in the jaxlib we pin) orders
the program so that independent thunks can run at the same time, which keeps many activations live at once. The
memory-optimized scheduler orders the same program to keep fewer buffers live. Same HLO, same results bit for bit
(only the order of independent ops changes), and measured on the 2-core development machine it is both smaller and
faster, because a smaller working set stays in cache and fewer pages are touched (``python -m benchmarks xla``
compiles the same programs both ways and times them in turn; its current table is in the README, the
measurements below in benchmarks/PERFORMANCE.md):

- training step, batch 8: XLA's temp buffers volo_d1_224 2184 -> 1610 MiB, ese_vovnet19b_dw 1384 -> 711 MiB,
  convit_base 2718 -> 1739 MiB; step throughput 1.15-1.42x on the four seed models, the same loss to the last bit;
- inference, batch 8: no change beyond the machine's noise (0.93-1.26x in one run, +2-4 % in another).

The option is a field of XLA's ``DebugOptions``; a jaxlib whose XLA does not know it (jax >= 0.6 is allowed) gets
no options rather than a compile error. GPU/TPU get none: their schedulers are latency/memory aware already.

:func:`reexec_with_hugepage_malloc` is the other half of XLA:CPU's runtime cost that lives outside the program: the
memory its temp buffer is served from (see there). train.py, eval.py, label_tokens and the benchmarks call it first
thing in ``__main__``.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["compiler_options", "CPU_OPTIONS", "hugepage_malloc_environ", "reexec_with_hugepage_malloc"]

log = logging.getLogger(__name__)

CPU_OPTIONS: dict[str, Any] = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's XLA accepts ``CPU_OPTIONS`` (one tiny compile, once per process)."""
    try:
        x = jax.device_put(jnp.zeros(()), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=CPU_OPTIONS)
    except Exception as e:  # an older XLA: unknown DebugOptions field or enum value
        log.info("XLA:CPU options %s not supported by this jaxlib (%s); compiling with XLA's defaults",
                 CPU_OPTIONS, str(e).splitlines()[0])
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The ``compiler_options`` for ``jax.jit`` on ``backend`` (default: JAX's default backend); a fresh dict."""
    backend = backend or jax.default_backend()
    if backend == "cpu" and _cpu_options_supported():
        return dict(CPU_OPTIONS)
    return {}


# glibc's malloc tunable (glibc >= 2.35): madvise(MADV_HUGEPAGE) on the memory malloc gets from mmap/sbrk.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
# "0" turns the re-exec off (e.g. under a debugger, or to measure without it).
HUGEPAGE_OPT_OUT = "VOLO_JAX_HUGEPAGE_MALLOC"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), None when unknown."""
    try:
        with open(_THP_ENABLED) as f:
            text = f.read()  # e.g. "always [madvise] never"
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepage_malloc_environ(environ: Mapping[str, str], *, libc: tuple[str, str] | None = None,
                            thp_mode: str | None = None, system: str | None = None) -> dict[str, str] | None:
    """The environment to re-execute with so that glibc's malloc asks for transparent huge pages, or None when there
    is nothing to do: not Linux/glibc >= 2.35, THP off (``never``) or unknown, ``GLIBC_TUNABLES`` already setting
    ``glibc.malloc.hugetlb`` (the user's value wins), or ``VOLO_JAX_HUGEPAGE_MALLOC=0``. Other tunables are kept.
    ``libc``/``thp_mode``/``system`` default to this machine's (arguments for tests)."""
    if environ.get(HUGEPAGE_OPT_OUT, "1") == "0":
        return None
    if (system or platform.system()) != "Linux":
        return None
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        major_minor = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or major_minor < (2, 35):
        return None
    if (thp_mode if thp_mode is not None else _thp_mode()) not in ("always", "madvise"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    return env


def reexec_with_hugepage_malloc() -> None:
    """Re-executes this process (same PID, interpreter flags and arguments) with glibc's huge-page malloc tunable in
    ``GLIBC_TUNABLES`` when :func:`hugepage_malloc_environ` says it applies; otherwise returns at once.

    Why: every execution of an XLA:CPU program allocates its temp buffer (activations, gradients, workspace) with
    ``posix_memalign``, and glibc serves a block that large (above its 32 MiB mmap-threshold cap) with a fresh
    ``mmap`` that is unmapped when the step ends. Each step therefore page-faults its whole temp buffer in again, 4 KiB
    at a time: about 424 000 faults per volo_d1_224 training step (1.5 GiB of temp buffer, batch 8). With
    ``glibc.malloc.hugetlb=1`` glibc marks those mappings ``MADV_HUGEPAGE`` and the kernel faults them in 2 MiB at a
    time (about 1 200 faults). Measured on the 2-core development machine, jitted training step at batch 8, each pair
    in fresh processes: volo_d1_224 2.81-2.94 -> 2.33-2.58 s, convit_base 4.50 -> 4.13 s, poolformer_m36 3.25 ->
    2.42 s, ese_vovnet19b_dw 0.78 -> 0.66 s; inference at batch 8 (49 MiB of temp buffer) unchanged. Keeping the
    memory instead (one malloc arena, no mmap) removed the faults but was slower (3.0-3.5 s for volo_d1_224).

    glibc reads its tunables only at process start, hence the re-exec; call this before any work (the CLIs call it
    first thing in ``__main__``). Scripts of your own can do the same, or export
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` before starting Python. ``VOLO_JAX_HUGEPAGE_MALLOC=0`` turns it off.
    """
    env = hugepage_malloc_environ(os.environ)
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    log.info("re-executing with GLIBC_TUNABLES=%s (huge pages for XLA:CPU's temp buffers)", env["GLIBC_TUNABLES"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
