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


import ctypes  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402

# Tests that hold up to ~12 GB at once: the large VOLO variants' parity (timm, our model, its converted copies and
# the features_only model) and the 8-device training step's subprocess (~8 GB). Two of them together would not fit in
# the 24 GB of the development/CI machine, so under pytest-xdist's `--dist loadgroup` they form one work unit that a
# single worker runs one after another, while the other worker takes every other test (the other families' large
# variants need far less: a whole `make test` peaked at 19.1 GB in use). pytest-xdist's own `xdist_group` marker
# cannot do this under pytest 9.2 (xdist renames `item._nodeid`, which pytest 9.2 no longer reads) and the scheduler
# only sees node ids, so the tests are named here: a test function of this name, any parametrization, in any test
# file.
LARGE_MEMORY_TESTS = frozenset({
    "test_volo_parity_large_variants",
    "test_train_step_same_on_1_and_8_devices",
})
LARGE_MEMORY_GROUP = "large-memory"


def _test_function_name(nodeid: str) -> str:
    """`tests/test_parity.py::test_volo_parity_large_variants[volo_d5_512]` -> `test_volo_parity_large_variants`."""
    return nodeid.split("::")[-1].split("[")[0]


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: `-p no:xdist` runs have no such hook
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: the LARGE_MEMORY_TESTS go to one worker as one unit (scheduled first, as the largest
    unit), every other test is a unit of its own. Other `--dist` modes keep pytest-xdist's schedulers."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class LargeMemoryOnOneWorker(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if _test_function_name(nodeid) in LARGE_MEMORY_TESTS:
                return LARGE_MEMORY_GROUP
            return super()._split_scope(nodeid)

    return LargeMemoryOnOneWorker(config, log)


@pytest.fixture
def jax_cache_for_subprocesses(tmp_path, monkeypatch):
    """JAX's persistent compilation cache, private to this test, for the processes it starts *one after another*
    (train.py runs that resume each other, the parity CLI's three runs): the second process loads the train step, eval
    step and initialisers the first compiled (a 3-run resume test 89 -> 52 s). Not for processes that run at the
    same time or are killed: jax 0.10.2 writes entries without a lock or an atomic rename. This pytest process
    read its JAX settings at import, so only the children use the cache."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-compilation-cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the initialisers compile in < 1 s each
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(autouse=True)
def _release_memory_after_slow_tests(request):
    """Large variants leave compiled programs and big buffers behind; drop them so one process can run them all."""
    yield
    if request.node.get_closest_marker("slow"):
        jax.clear_caches()
        gc.collect()
        _malloc_trim()


def _malloc_trim() -> None:
    """Hand glibc's freed heap back to the system: after a large VOLO variant, `gc` alone leaves the process at
    2.7-3.7 GB where the trim brings it to 1.1 GB (measured on volo_d2_384 and volo_d3_448), and a worker that keeps
    what it freed holds ~12 GB by the end of the large variants. Other C libraries have no such call."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no process-wide symbol table (Windows)
        return
    if trim is not None:
        trim(0)
