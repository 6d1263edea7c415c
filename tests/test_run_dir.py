"""The run directory is sacred: a command that would replace an earlier run there (a finished one,
or an interrupted one that ``resume`` does not continue) is refused with one line before Hydra
writes anything, and ``resume=auto`` into a finished run leaves it as it was. Every file of the
run is hashed before and after."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import fingerprint, one_line_error, run_cli, tiny
from metarun.errors import OutputExistsError
from metarun.loop import check_run_dir


@pytest.fixture
def interrupted(finished, tmp_path) -> Path:
    """The finished run as if killed after its last checkpoint: checkpoints/last.pt, no results.json."""
    out = tmp_path / "interrupted"
    shutil.copytree(finished, out)
    (out / "results.json").unlink()
    return out


def test_a_new_run_into_an_interrupted_run_is_refused_naming_resume(interrupted, tmp_path):
    before = fingerprint(interrupted)
    proc = run_cli(*tiny(f"hydra.run.dir={interrupted}"), cwd=tmp_path)
    one_line_error(proc, "interrupted run", f"resume={interrupted}")
    assert fingerprint(interrupted) == before


def test_resuming_another_run_into_an_interrupted_run_is_refused(interrupted, finished, tmp_path):
    before = fingerprint(interrupted)
    proc = run_cli(*tiny("iterations=3", f"resume={finished}", f"hydra.run.dir={interrupted}"), cwd=tmp_path)
    one_line_error(proc, "interrupted run", f"resume={interrupted}")
    assert fingerprint(interrupted) == before


@pytest.mark.parametrize("extra", [("algorithm=protonet",), ("iterations=3", "resume={run}")],
                         ids=["other-algorithm", "resume-the-finished-run"])
def test_a_refused_command_in_a_finished_run_leaves_every_byte(finished, tmp_path, extra):
    before = fingerprint(finished)
    proc = run_cli(*tiny(*(e.format(run=finished) for e in extra), f"hydra.run.dir={finished}"), cwd=tmp_path)
    one_line_error(proc, "already holds a finished run")
    assert fingerprint(finished) == before


def test_resume_auto_into_a_finished_run_exits_0_and_leaves_every_byte(finished, tmp_path):
    before = fingerprint(finished)
    proc = run_cli(*tiny("resume=auto", f"hydra.run.dir={finished}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "already holds a finished run" in proc.stdout
    assert fingerprint(finished) == before


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    """A finished two-job multirun (seed=0,1) in a fixed hydra.sweep.dir."""
    sweep = tmp_path_factory.mktemp("finished-sweep") / "sweep"
    proc = run_cli("-m", *tiny("seed=0,1", f"hydra.sweep.dir={sweep}"), cwd=sweep.parent)
    assert proc.returncode == 0, proc.stderr
    assert len(list(sweep.glob("*/results.json"))) == 2
    return sweep


@pytest.mark.parametrize("first_job_gone", [False, True], ids=["same-sweep", "second-job"])
def test_a_multirun_into_finished_jobs_is_refused_before_hydra_writes_anything(finished_sweep, tmp_path,
                                                                             first_job_gone):
    """The job directories Hydra's sweeper will make are computed up front: the first that holds a finished run
    is named, and neither multirun.yaml nor any job's .hydra/ is rewritten (they used to be, before each job
    refused itself); a job before it does not run either (with job 0's directory gone, it is not made again)."""
    sweep = Path(shutil.copytree(finished_sweep, tmp_path / "sweep"))
    if first_job_gone:
        shutil.rmtree(next(sweep.glob("0_*")))
    before = fingerprint(sweep)
    proc = run_cli("-m", *tiny("seed=0,1", f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    one_line_error(proc, "job 1 (seed=1)" if first_job_gone else "job 0 (seed=0)",
                   "already holds a finished run (results.json); choose another hydra.sweep.dir")
    assert fingerprint(sweep) == before


def test_resume_auto_reruns_a_finished_sweep_as_nothing_to_do(finished_sweep, tmp_path):
    results = {p: p.read_bytes() for p in finished_sweep.glob("*/results.json")}
    proc = run_cli("-m", *tiny("seed=0,1", "resume=auto", f"hydra.sweep.dir={finished_sweep}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {p: p.read_bytes() for p in finished_sweep.glob("*/results.json")} == results


def test_resume_continues_an_interrupted_run_in_place(interrupted, tmp_path):
    proc = run_cli(*tiny("iterations=3", f"resume={interrupted}", f"hydra.run.dir={interrupted}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (interrupted / "results.json").is_file()


def test_check_run_dir_says_what_each_directory_allows(tmp_path):
    assert check_run_dir(tmp_path / "new", None) is False
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    run = tmp_path / "run"
    with pytest.raises(OutputExistsError, match=f"resume={run}"):
        check_run_dir(run, None)
    with pytest.raises(OutputExistsError, match="interrupted run"):
        check_run_dir(run, str(tmp_path / "other"))
    assert check_run_dir(run, str(run)) is False
    assert check_run_dir(run, str(last)) is False
    assert check_run_dir(run, "auto") is False
    (run / "results.json").write_text("{}")
    assert check_run_dir(run, "auto") is True
    with pytest.raises(OutputExistsError, match="already holds a finished run"):
        check_run_dir(run, str(run))
