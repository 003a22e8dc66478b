"""`python -m benchmarks ... --readme FILE`: the tables go into their marked block of the file, atomically; a file
without the markers stops the run before any benchmarking and is left as it was."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]

README = """# Project

Intro text, kept byte for byte.

## Benchmarks

Prose above the table.

<!-- benchmarks:models -->
old table
<!-- /benchmarks:models -->

Prose below, also kept.
"""


def test_update_readme_replaces_only_the_block(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(README)
    path.chmod(0o644)
    report.update_readme(path, "models", "| a |\n|---|\n| 1 |")
    text = path.read_text()
    before, rest = text.split("<!-- benchmarks:models -->\n")
    block, after = rest.split("<!-- /benchmarks:models -->\n")
    assert before == README.split("<!-- benchmarks:models -->\n")[0]
    assert after == "\nProse below, also kept.\n"
    assert block == "\n| a |\n|---|\n| 1 |\n\n"
    assert "old table" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the atomic replace keeps the file's permissions
    report.update_readme(path, "models", "| a |\n|---|\n| 1 |")
    assert path.read_text() == text  # idempotent: a second write of the same block changes nothing
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temp file left behind


@pytest.mark.parametrize("text", [
    README.replace("<!-- /benchmarks:models -->\n", ""),  # no end marker
    README.replace("<!-- benchmarks:models -->\n", ""),  # no begin marker
    README + "<!-- benchmarks:models -->\n<!-- /benchmarks:models -->\n",  # two blocks
    README.replace("<!-- benchmarks:models -->\nold table\n<!-- /benchmarks:models -->",
                   "<!-- /benchmarks:models -->\nold table\n<!-- benchmarks:models -->"),  # out of order
], ids=["no-end", "no-begin", "twice", "reversed"])
def test_update_readme_refuses_bad_markers_and_writes_nothing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "README.md"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"benchmarks:models.*Nothing was written"):
        report.update_readme(path, "models", "new")
    assert path.read_text() == text


def test_render_block_names_command_time_and_machine() -> None:
    import datetime

    t0 = datetime.datetime(2026, 12, 6, 14, 5, tzinfo=datetime.timezone.utc)
    block = report.render_block("python -m benchmarks models --batch 8", t0, t0 + datetime.timedelta(minutes=40),
                                report.machine_summary(), ["| a |\n|---|\n| 1 |"])
    head = block.split("\n")[0]
    assert "`python -m benchmarks models --batch 8`" in head and "2026-12-06 14:05-14:45 UTC" in head
    assert "cores" in head and "jax " in head and "torch " in head and "GLIBC_TUNABLES=" in head
    assert block.endswith("| 1 |")


def test_missing_markers_stop_the_run_before_benchmarking(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# no markers here\n")
    env = {**os.environ, "VOLO_JAX_HUGEPAGE_MALLOC": "0"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "models", "--models", "volo_d1_224",
                           "--readme", str(path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode != 0
    assert "--readme" in proc.stderr and "<!-- benchmarks:models -->" in proc.stderr
    assert "fp32 matmul" not in proc.stdout  # stopped before the first measurement
    assert path.read_text() == "# no markers here\n"


def test_per_process_run_records_every_model_and_keeps_readme_to_itself(monkeypatch, tmp_path: Path) -> None:
    """Several --models run in child processes; the parent, not the children, writes the README block."""
    import argparse

    from benchmarks import bench_models

    commands = []

    def fake_run(cmd, **kwargs):  # a child that measured something: its --json result
        commands.append(cmd)
        name = cmd[cmd.index("--models") + 1]
        out = {"device": "cpu (cpu)", "dtype": "float32", "models": {name: {
            "img_size": 224, "matmul_gflops": 100.0,
            "inference": {"8": {"ours_img_s": 10.0, "timm_img_s": 8.0, "gflop": 5.0, "compile_s": 2.0}}}}}
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(out))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_models.subprocess, "run", fake_run)
    parser = argparse.ArgumentParser()
    bench_models.add_arguments(parser)
    parser.add_argument("--readme")
    args = parser.parse_args(["--models", "volo_d1_224", "convit_base", "--batch", "8", "--train-batch", "0",
                              "--no-convert", "--readme", str(tmp_path / "README.md")])
    rec = bench_models._run_per_process(args, report.Recorder())
    assert len(commands) == 2 and not any("--readme" in c for c in commands)
    md = "\n\n".join(rec.parts)
    assert "| volo_d1_224 | 8 | 10.0 | 8.0 | - | 1.25x | - |" in md and "| convit_base | 8 |" in md
    assert "GFLOP/s: volo_d1_224 100, convit_base 100" in md


@pytest.mark.slow
def test_models_benchmark_writes_its_tables_into_the_readme(tmp_path: Path) -> None:
    """End to end on a small model: the real measurements land in the block, the rest of the file is untouched."""
    path = tmp_path / "README.md"
    path.write_text(README)
    env = {**os.environ, "VOLO_JAX_HUGEPAGE_MALLOC": "0"}
    cmd = [sys.executable, "-m", "benchmarks", "models", "--models", "poolformer_s12", "--img-size", "64",
           "--batch", "2", "--train-batch", "2", "--repeats", "1", "--warmup", "0", "--no-compile", "--no-memory",
           "--matmul", "256", "--settle-ms", "0", "--readme", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = path.read_text()
    block = text.split("<!-- benchmarks:models -->\n")[1].split("<!-- /benchmarks:models -->")[0]
    assert "python -m benchmarks models --models poolformer_s12 --img-size 64" in block
    assert "\n| poolformer_s12 | 2 | " in block  # an inference row and a training row
    assert block.count("| poolformer_s12 |") == 3  # inference, training step, conversion
    assert text.startswith(README.split("<!-- benchmarks:models -->")[0])
    assert text.endswith("<!-- /benchmarks:models -->\n\nProse below, also kept.\n")
