"""train.py across processes and through a SIGKILL, on real images (scikit-learn's digits as an image folder).

- Two processes of two devices each train like one process of four devices: the same global batches (each process
  reads its block of every global batch, augmented as the one process would), the same loss curve, eval and weights;
  only process 0 writes metrics, TensorBoard events and config.json.
- A run killed with SIGKILL between checkpoints, then started again with the same command, resumes from its last
  complete checkpoint (a half-written one is ignored and cleaned up) and ends with the curve and the weights of a run
  that was never interrupted, bit for bit; metrics.jsonl holds every step once.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

import volo_jax  # noqa: E402
from volo_jax import data  # noqa: E402
from volo_jax.checkpoint import TrainCheckpoints  # noqa: E402
from volo_jax.tools.digits import write_digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "ese_vovnet19b_slim_dw"  # BatchNorm everywhere: its batch statistics are all-reduced over the processes
ARGS = ["--model", MODEL, "--img-size", "32", "--epochs", "2", "--warmup-epochs", "0.5", "--lr", "1e-3",
        "--model-ema-decay", "0.9", "--drop-path", "0.1", "--workers", "2", "--log-every", "1", "--eval-every", "100"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("d") / "digits", size=32)


def _start(log: Path, *args, devices: int) -> subprocess.Popen:
    """train.py in the background, on ``devices`` simulated CPU devices, stdout/stderr to ``log``.out/.err."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                                stdout=out, stderr=err)


def _finish(proc: subprocess.Popen, log: Path) -> tuple[str, str]:
    """Waits for ``proc``; its stdout and stderr, after asserting it succeeded."""
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    assert proc.returncode == 0, f"{log.name}: exit {proc.returncode}\n{err[-3000:]}"
    return out, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _weights(run: Path, use_ema: bool = False) -> dict[str, np.ndarray]:
    """Parameters and BatchNorm statistics of a run's latest checkpoint, by NNX path."""
    from flax import nnx

    model = volo_jax.create_model(MODEL, num_classes=10, img_size=32)
    TrainCheckpoints(run / "checkpoints", read_only=True).restore_weights(model, use_ema=use_ema)
    return {".".join(map(str, path)): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


def _complete_steps(checkpoints: Path) -> list[int]:
    """Steps orbax has finalised: it writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` when
    every item is on disk."""
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [int(m) for m in re.findall(r'"step": (\d+), "kind": "train"', path.read_text())] if path.exists() else []


def test_processes_split_each_global_batch_like_one_process(digits):
    """The data side of the first test, fast: the two processes' local batches, concatenated in process order (as
    ``jax.make_array_from_process_local_data`` lays them out on the mesh), are the one-process global batch."""
    source = data.ImageFolderSource(digits, split="train")
    cfg = data.TrainConfig(img_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, auto_augment="rand-m9-mstd0.5-inc1")
    one, _ = data.train_batches(source, cfg, 8, seed=7, workers=2)
    two = [data.train_batches(source, cfg, 8, seed=7, process_index=p, process_count=2, workers=2)[0]
           for p in range(2)]
    for _ in range(3):
        want, parts = next(one), [next(it) for it in two]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])


@pytest.mark.slow
def test_two_processes_train_like_one(digits, tmp_path):
    # Learning rate 0: every step's loss and gradient are then functions of that step's global batch alone (data,
    # RandAugment, mixup, drop-path keys, BatchNorm over the global batch), so every step can be compared tightly.
    # With a real learning rate the curves are not bit-identical and drift apart: one process all-reduces the four
    # devices' partial sums with XLA's in-process CPU collectives, two processes with gloo, in another order; the
    # last-bit differences in the gradients are then amplified by AdamW (where a gradient is itself at rounding
    # level its step is lr * g / |g| whatever the size of g). Measured over 6 steps with RandAugment: losses 3e-7
    # relative apart at step 1, 1.4e-4 at step 6 (without it: equal at step 1, 8e-7 at step 6). A learning run is
    # compared bit for bit in the SIGKILL test below, where the device layout stays the same.
    steps, args = 6, [digits, *ARGS, "-b", 4, "--max-steps", 6, "--lr", 0, "--warmup-lr", 0, "--min-lr", 0]
    one, two = tmp_path / "one", tmp_path / "two"
    port = _free_port()
    # All three at once: each process spends most of its time compiling on one thread.
    logs = [tmp_path / "one", tmp_path / "two0", tmp_path / "two1"]
    procs = [_start(logs[0], *args, "--output", one, devices=4)]
    procs += [_start(logs[1 + i], *args, "--output", two, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                     "--process-id", i, devices=2) for i in range(2)]
    (out1, _), (out_p0, _), (out_p1, _) = [_finish(p, log) for p, log in zip(procs, logs, strict=True)]
    for out in (out1, out_p0):
        assert "4 device(s) x 4 = global batch 16" in out and "done: 6 steps" in out
    assert "global batch" not in out_p1 and "done:" not in out_p1  # process 1 reports nothing ...
    # ... and writes nothing of its own: every step is logged once, one TensorBoard event file, one config.json.
    assert [r["step"] for r in _rows(two, "train")] == list(range(1, steps + 1))
    assert len(list((two / "tb").iterdir())) == 1
    assert json.loads((two / "config.json").read_text())["batch_size"] == 4

    # Same rows of the same global batches on the same devices; only the order of the cross-device sums differs
    # (above). Measured: losses equal or 1e-7 apart (the last bit of fp32), eval loss 1.5e-7. rtol 1e-5; another
    # batch changes the loss at the 1e-2 level. The gradient norm is worse conditioned here: at 32 px the last stage
    # is 1x1, its BatchNorm normalises 16 values per channel, and a channel of near-zero variance magnifies rounding
    # differences (measured up to 4.5e-4 relative, at steps where the loss agreed to the last bit); rtol 5e-3 still
    # catches gradients that miss the other process's rows.
    train1, train2 = _rows(one, "train"), _rows(two, "train")
    assert [r["step"] for r in train1] == [r["step"] for r in train2]
    np.testing.assert_allclose([r["loss"] for r in train2], [r["loss"] for r in train1], rtol=1e-5, atol=0)
    np.testing.assert_allclose([r["grad_norm"] for r in train2], [r["grad_norm"] for r in train1], rtol=5e-3)
    assert len({r["loss"] for r in train1}) == steps  # each step its own batch
    (eval1,), (eval2,) = _rows(one, "eval"), _rows(two, "eval")
    assert eval1["step"] == eval2["step"] == steps and eval1["count"] == eval2["count"] > 0
    for key in ("top1", "top5", "ema_top1", "ema_top5"):  # measured equal; one image may sit on a near tie
        assert eval2[key] == pytest.approx(eval1[key], abs=100.0 / eval1["count"] + 1e-9), key
    assert eval2["loss"] == pytest.approx(eval1["loss"], rel=1e-5)
    # Checkpoints (written by both processes): the parameters are untouched at lr 0, so equal; the BatchNorm running
    # statistics average 6 global batches' statistics (measured 1.3e-6 of each tensor's scale apart).
    for use_ema in (False, True):
        w1, w2 = _weights(one, use_ema), _weights(two, use_ema)
        for k in w1:
            if k.endswith((".mean", ".var")):
                np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5 * np.abs(w1[k]).max(), err_msg=k)
            else:
                np.testing.assert_array_equal(w2[k], w1[k], err_msg=k)


@pytest.mark.slow
def test_sigkilled_run_reruns_to_the_same_curve(digits, tmp_path):
    steps = 12
    args = [digits, *ARGS, "-b", 4, "--max-steps", steps, "--save-every", 2]
    straight, run = tmp_path / "straight", tmp_path / "run"
    ref = _start(tmp_path / "straight", *args, "--output", straight, devices=2)
    victim = _start(tmp_path / "killed", *args, "--output", run, devices=2)
    try:
        # Kill it while it trains: a checkpoint past step 2 is complete and it has logged steps after it.
        deadline = time.monotonic() + 600
        while not ((done := _complete_steps(run / "checkpoints")) and done[-1] > 2
                   and max(_logged_steps(run)) > done[-1]):
            assert victim.poll() is None, (victim.returncode, (tmp_path / "killed.err").read_text()[-3000:])
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL  # it had not finished on its own
    finally:
        if victim.poll() is None:
            victim.kill()
    _finish(ref, tmp_path / "straight")
    resume_step = _complete_steps(run / "checkpoints")[-1]
    assert 2 < resume_step < steps
    logged = _logged_steps(run)
    assert max(logged) > resume_step  # rows the rerun computes again
    # A save cut short by the kill leaves orbax's temporary directory; make sure there is one (the kill may or may
    # not have hit a save), half-written: the rerun must neither pick it up nor trip over it.
    half = run / "checkpoints" / f"{resume_step + 2}.orbax-checkpoint-tmp-1"
    shutil.copytree(run / "checkpoints" / str(resume_step), half)
    shutil.rmtree(half / "params")

    _, err = _finish(_start(tmp_path / "rerun", *args, "--output", run, devices=2), tmp_path / "rerun")
    assert re.search(rf"Resumed from \S+ step {resume_step}\b", err), err[-3000:]
    assert not list((run / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # cleaned up
    # metrics.jsonl: the rows the killed run logged past its checkpoint were dropped on resume, so every step is
    # there once, and the curve is the uninterrupted one, bit for bit (the data position and the PRNG key are in
    # the checkpoint; same devices, same programs).
    got, want = _rows(run, "train"), _rows(straight, "train")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, steps + 1))
    for a, b in zip(got, want, strict=True):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]
    assert _rows(run, "eval") == _rows(straight, "eval")
    for use_ema in (False, True):
        a, b = _weights(run, use_ema), _weights(straight, use_ema)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert TrainCheckpoints(run / "checkpoints", read_only=True).latest_step() == steps
