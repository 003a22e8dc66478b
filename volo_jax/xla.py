"""XLA compiler options for our jitted programs, per backend: ``jax.jit(fn, compiler_options=compiler_options())``.

On XLA:CPU the default HLO scheduler (``CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED`` in the jaxlib we pin) orders
the program so that independent thunks can run at the same time, which keeps many activations live at once. The
memory-optimized scheduler orders the same program to keep fewer buffers live. Same HLO, same results bit for bit
(only the order of independent ops changes), and measured on the 2-core development machine it is both smaller and
faster, because a smaller working set stays in cache and fewer pages are touched (``python -m benchmarks xla``
compiles the same programs both ways and times them in turn; its table is in the README):

- training step, batch 8: XLA's temp buffers volo_d1_224 2184 -> 1610 MiB, ese_vovnet19b_dw 1384 -> 711 MiB,
  convit_base 2718 -> 1739 MiB; step throughput 1.15-1.42x on the four seed models, the same loss to the last bit;
- inference, batch 8: no change beyond the machine's noise (0.93-1.26x in one run, +2-4 % in another).

The option is a field of XLA's ``DebugOptions``; a jaxlib whose XLA does not know it (jax >= 0.6 is allowed) gets
no options rather than a compile error. GPU/TPU get none: their schedulers are latency/memory aware already.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["compiler_options", "CPU_OPTIONS"]

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
