"""Bad input at the edges of a run: one line `metarun: error: ...`, exit 2, and nothing written before is
lost. Checkpoints never run code when loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fingerprint, one_line_error, run_cli, tiny


class Payload:
    """Unpickling this would create a file: what a malicious "checkpoint" does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"algorithm": Payload(marker)}, evil)
    proc = run_cli(*tiny(f"resume={evil}", f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    one_line_error(proc, "would run code when unpickled, refused")
    assert not marker.exists()


@pytest.mark.parametrize("make,expected", [
    (lambda run, tmp: tmp.joinpath("garbage.pt").write_bytes(os.urandom(300)) and tmp / "garbage.pt",
     "is not a readable metarun checkpoint"),
    (lambda run, tmp: run / "results.json", "is not a readable metarun checkpoint"),
    (lambda run, tmp: tmp.joinpath("cut.pt").write_bytes((run / "checkpoints" / "last.pt").read_bytes()[:5000])
     and tmp / "cut.pt", "is not a readable metarun checkpoint"),
    (lambda run, tmp: run / "checkpoints" / "best.pt", "holds model weights only"),
], ids=["garbage", "results-json", "truncated", "best-pt"])
def test_a_file_that_is_not_a_run_checkpoint_is_one_line(finished, tmp_path, make, expected):
    before = fingerprint(finished)
    path = make(finished, tmp_path)
    proc = run_cli(*tiny(f"resume={path}", f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    one_line_error(proc, expected)
    assert fingerprint(finished) == before


@pytest.mark.parametrize("change,expected", [
    ("optimizer=sgd", "optimizer._target_: torch.optim.Adam -> torch.optim.SGD"),
    ("backbone=mlp", "backbone._target_: metarun.backbones.Conv4 -> metarun.backbones.MLP"),
    ("algorithm=anil", "algorithm._target_: metarun.algorithms.maml.MAML -> metarun.algorithms.anil.ANIL"),
    ("shots=2", "shots: 1 -> 2"),
])
def test_resuming_with_other_settings_names_the_keys_that_differ(finished, tmp_path, change, expected):
    before = fingerprint(finished)
    proc = run_cli(*tiny(change, "iterations=3", f"resume={finished}", f"hydra.run.dir={tmp_path / 'run'}"),
                   cwd=tmp_path)
    one_line_error(proc, expected)
    assert "resume with the same settings" in proc.stderr
    assert fingerprint(finished) == before


def test_resuming_with_fewer_iterations_than_the_checkpoint_has_done_says_so(finished, tmp_path):
    """The finished run's last.pt is at iteration 2: iterations=1 cannot continue it (it used to blame a
    missing best.pt)."""
    before = fingerprint(finished)
    proc = run_cli(*tiny("iterations=1", f"resume={finished}", f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    one_line_error(proc, "the checkpoint is already at iteration 2, past iterations=1; resume with iterations >= 2")
    assert fingerprint(finished) == before
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resuming_may_change_the_length_and_the_evaluation(finished, tmp_path):
    proc = run_cli(*tiny("iterations=3", "eval.tasks=6", "eval_every=2", f"resume={finished}",
                         f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["eval_tasks"] == 6


@pytest.mark.parametrize("overrides,expected", [
    (["ways=1"], "ways=1: a classification task needs >= 2 classes"),
    (["algorithm=protonet", "algorithm.inner_lr=0.1"], "algorithm=protonet has no option inner_lr; its options: "
                                                        "distance, cosine_scale"),
    (["output_dir=/sys/metarun_read_only"], "cannot write into the run directory /sys/metarun_read_only"),
])
def test_values_no_run_can_use_are_one_line(tmp_path, overrides, expected):
    one_line_error(run_cli(*tiny(*overrides, f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path), expected)


def test_a_run_directory_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    for option in ("hydra.run.dir", "output_dir"):
        proc = run_cli(*tiny(f"{option}={target}"), cwd=tmp_path)
        one_line_error(proc, "is an existing file")
        assert target.read_text() == "mine"


def test_a_full_disk_while_checkpointing_keeps_the_previous_last_pt(compose_cfg, tmp_path, monkeypatch):
    from metarun import checkpoint
    from metarun.errors import CheckpointError
    from metarun.loop import run

    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(obj.keys())
        if "optimizer" in obj and sum("optimizer" in keys for keys in saves) == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    with pytest.raises(CheckpointError, match="No space left on device; the previous last.pt, if any, "
                                                          "is intact"):
        run(compose_cfg("iterations=3"), tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    saved = checkpoint.safe_load(tmp_path / "checkpoints" / "last.pt")
    assert saved["state"]["iteration"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_exits_with_one_line_and_a_usable_checkpoint(tmp_path):
    out = tmp_path / "run"
    # PYTHONFAULTHANDLER: if the job does not stop, SIGABRT makes it print where each thread is (below)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    args = [sys.executable, "-m", "metarun", *tiny("iterations=100000", "checkpoint_every=1", "eval_every=1000",
                                                   f"hydra.run.dir={out}")]
    # A shell ignores SIGINT in what it starts in the background (`make test &`), the ignoring is inherited, and
    # Python then installs no KeyboardInterrupt handler: the job trained on through the SIGINT below, which was this
    # test's "hang" in CI runs started that way. The job gets SIGINT's default back, as in a terminal.
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 600  # a loaded machine can take minutes to start the job
    while not last.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert last.exists(), "the job wrote no checkpoint to interrupt after"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=180)  # a loaded machine (CI beside a training job) took over 60 s once
    except subprocess.TimeoutExpired:
        # The traceback faulthandler prints on SIGABRT says where the job was (how the cause above was found).
        proc.send_signal(signal.SIGABRT)
        _, stderr = proc.communicate(timeout=60)
        stacks = stderr.split("\nExtension modules:")[0]  # the stacks come first, then a long list of modules
        pytest.fail(f"no exit within 180 s of SIGINT; the job's stacks on SIGABRT:\n{stacks[:6000]}")
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metarun: interrupted;") and f"resume={out}" in lines[0], stderr
    from metarun.checkpoint import safe_load

    assert safe_load(last)["state"]["iteration"] >= 1


@pytest.mark.parametrize("override,expected", [
    ("algorithm=nope", ["Could not find 'algorithm/nope'", "Available options", "maml", "protonet"]),
    ("foo=1", ["Could not override 'foo'", "Key 'foo' not in 'RunConfig'"]),
    ("iterations=abc", ["Value 'abc' of type 'str' could not be converted to Integer", "full_key: iterations"]),
])
def test_hydra_reports_unknown_groups_keys_and_types_itself(tmp_path, override, expected):
    """Hydra's convention, left as it is: its message names the group's valid choices, or the key."""
    proc = run_cli(*tiny(override, f"hydra.run.dir={tmp_path / 'run'}"), cwd=tmp_path)
    assert proc.returncode == 1
    for text in expected:
        assert text in proc.stderr, proc.stderr


@pytest.mark.slow
def test_kill_and_resume_campaign_is_bit_exact(tmp_path):
    """scripts/kill_resume.py with N = 3: SIGKILL while a checkpoint is written, during the final test
    evaluation, and at random; every resumed run ends bit-exactly where the uninterrupted one does."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "kill_resume.py"), "--trials", "3", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bit-exact: 3/3; corrupt checkpoints: 0/" in proc.stdout


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_the_file(tmp_path, monkeypatch):
    """SIGINT in the middle of torch.save: the file is finished and renamed into place, then KeyboardInterrupt
    (torch's zip writer turned an interrupt inside it into a RuntimeError traceback)."""
    from metarun import checkpoint

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal job
    real_save = checkpoint.torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here: without the deferral, KeyboardInterrupt now
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted_save)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.atomic_save({"iteration": 3}, tmp_path / "last.pt")
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"iteration": 3}  # complete, readable
    assert after is signal.default_int_handler  # the deferral put Python's handler back
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
