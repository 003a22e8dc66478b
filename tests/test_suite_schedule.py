"""`make test`'s scheduling (tests/conftest.py): the tests that need up to ~12 GB run on one pytest-xdist worker.

If a test in conftest.LARGE_MEMORY_TESTS were renamed, the scheduler would silently hand it to any worker and two
large variants could meet in 24 GB; these checks fail instead.
"""
import ast
import pathlib
from types import SimpleNamespace

import conftest
import pytest

pytest.importorskip("xdist")

TESTS = pathlib.Path(__file__).parent


def _test_functions() -> dict[str, str]:
    """Every module-level `test_*` function in tests/: name -> file name."""
    found = {}
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                found[node.name] = path.name
    return found


class _LoadGroupConfig:
    """What the scheduler reads of pytest's config under `-n 2 --dist loadgroup`: `dist`, `tx` (the worker count)
    and `loadscopereorder`."""

    option = SimpleNamespace(loadscopereorder=True)

    def __init__(self, dist: str = "loadgroup"):
        self._values = {"dist": dist, "tx": ["2*popen"]}

    def getvalue(self, name: str):
        return self._values[name]


def test_every_large_memory_test_exists():
    missing = conftest.LARGE_MEMORY_TESTS - set(_test_functions())
    assert not missing, f"conftest.LARGE_MEMORY_TESTS names tests that do not exist: {sorted(missing)}"


def test_large_memory_tests_form_one_unit_and_the_rest_are_single():
    sched = conftest.pytest_xdist_make_scheduler(config=_LoadGroupConfig(), log=None)
    tests = _test_functions()
    for name, file in tests.items():
        for nodeid in (f"tests/{file}::{name}", f"tests/{file}::{name}[volo_d5_512]"):
            scope = sched._split_scope(nodeid)
            if name in conftest.LARGE_MEMORY_TESTS:
                assert scope == conftest.LARGE_MEMORY_GROUP, nodeid
            else:
                assert scope == nodeid, nodeid


def test_other_dist_modes_keep_xdist_schedulers():
    assert conftest.pytest_xdist_make_scheduler(config=_LoadGroupConfig("load"), log=None) is None
