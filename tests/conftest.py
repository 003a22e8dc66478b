"""Test configuration shared by the whole suite.

Parity is the specification, so every JAX matmul/conv runs at full fp32 precision (`highest`); otherwise XLA may
use reduced-precision passes on some backends and a tolerance would hide a real bug.
"""
import os

# Keep each pytest worker from oversubscribing the 2 cores: XLA and torch each default to one thread per core.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_enable_x64", False)

try:  # torch is an optional extra; tests that need it import it via pytest.importorskip.
    import torch  # noqa: E402

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
except ImportError:  # pragma: no cover
    pass


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _release_memory_after_slow_tests(request):
    """Large variants leave compiled programs and big buffers behind; drop them so one process can run them all."""
    yield
    if request.node.get_closest_marker("slow"):
        jax.clear_caches()
        gc.collect()
