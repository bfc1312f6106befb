"""The run directory through `tsm train` on a tiny SD1.5: --resume checks the config, one run per folder
(run.lock), a fresh run does not write into another run, and a full disk, a damaged checkpoint or SIGTERM
each end in one line (SIGTERM after writing a checkpoint that --resume finishes from)."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli_train import one_line_error, run_cli
from tiny_models import subprocess_env, write_tiny_model

from tsm.data import write_digits_image_folder
from tsm.rundir import LOCK


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rundir_assets")
    return {
        "sd15": write_tiny_model("sd15", root / "sd15"),
        "images": write_digits_image_folder(root / "images", n=4, size=16),
    }


def config(path: Path, assets: dict, **train) -> Path:
    """A 4-step run with checkpoints at 2 and 4, no grids and no tracker (fast)."""
    cfg = {
        "model": {"family": "sd15", "path": str(assets["sd15"])},
        "experts": {"scales": [2, 1], "rank": 2, "alpha": 2},
        "data": {"path": str(assets["images"]), "resolution": 16},
        "optim": {"lr": 1e-3},
        "train": {
            "steps": 4,
            "batch_size": 2,
            "checkpoint_every": 2,
            "keep_last": 3,
            "output_dir": str(path.with_suffix("")),
            "validation_prompts": [],
            "log_with": "none",
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory) -> Path:
    """A run that trained its 4 steps (checkpoints step 2 and 4); tests copy it."""
    cfg = config(tmp_path_factory.mktemp("rundir_finished") / "run.yaml", assets)
    assert run_cli("train", cfg)[0] == 0
    return cfg.with_suffix("")


def copy_of(finished: Path, tmp_path: Path, assets: dict, **train) -> tuple[Path, Path]:
    """(config, run folder): a copy of the finished run, and its config pointing at the copy."""
    shutil.copytree(finished, tmp_path / "run")
    return config(tmp_path / "run.yaml", assets, **train), tmp_path / "run"


def snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()
    }


# ---------------------------------------------------------------------------------------------------------
# --resume and the saved config
# ---------------------------------------------------------------------------------------------------------
def test_resume_refuses_a_changed_lr_in_one_line_and_writes_nothing(finished, assets, tmp_path, capsys):
    cfg, run = copy_of(finished, tmp_path, assets)
    before = snapshot(run)
    msg = one_line_error(capsys, "train", cfg, "--resume", "optim.lr=1e-2", "experts.rank=3", "data.path=/x")
    assert "optim.lr 0.001 -> 0.01" in msg and "experts.rank 2 -> 3" in msg
    assert f"data.path {str(assets['images'])!r} -> '/x'" in msg
    assert snapshot(run) == before  # config.yaml included: `tsm sample` still reads the run
    # lowering train.steps below the checkpoint's step: refused too
    msg = one_line_error(capsys, "train", cfg, "--resume", "train.steps=3")
    assert "train.steps=3" in msg and "step 4" in msg
    assert snapshot(run) == before and not (run / LOCK).exists()


def test_resume_extends_steps_given_after_resume_and_cleans_leftovers(finished, assets, tmp_path, capsys):
    cfg, run = copy_of(finished, tmp_path, assets)
    (run / "checkpoints" / "step_0000005.tmp").mkdir()  # what a run killed mid-checkpoint leaves
    handler = signal.getsignal(signal.SIGTERM)
    code, err = run_cli("train", cfg, "--resume", "train.steps=6", "train.keep_last=2", capsys=None)
    out = capsys.readouterr().out
    assert code == 0, err
    assert signal.getsignal(signal.SIGTERM) is handler  # train() put the previous handler back
    assert "train.steps 4 -> 6" in out and "train.keep_last 3 -> 2" in out and "step_0000005.tmp" in out
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["start"], summary["steps"]) == (4, 6)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    assert not (run / LOCK).exists()


def test_resuming_a_finished_run_leaves_it_untouched(finished, assets, tmp_path, capsys):
    cfg, run = copy_of(finished, tmp_path, assets)
    before = snapshot(run)
    time.sleep(0.01)  # a rewrite would show in the mtimes
    code, _ = run_cli("train", cfg, "--resume", "train.log_every=5")
    out = capsys.readouterr().out
    assert code == 0 and "nothing to train" in out
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------------
# one run per folder
# ---------------------------------------------------------------------------------------------------------
def write_lock(run: Path, pid: int) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def test_a_live_lock_refuses_a_second_run(assets, tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg = config(tmp_path / "run.yaml", assets)
        write_lock(tmp_path / "run", other.pid)
        msg = one_line_error(capsys, "train", cfg)
        assert f"pid {other.pid}" in msg and "in use" in msg
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK]  # nothing else written
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == other.pid  # not taken
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over(assets, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cfg = config(tmp_path / "run.yaml", assets, steps=1)
    write_lock(tmp_path / "run", dead.pid)
    code, err = run_cli("train", cfg)
    out = capsys.readouterr().out
    assert code == 0, err
    assert "took over" in out and f"pid {dead.pid}" in out
    assert not (tmp_path / "run" / LOCK).exists()  # released at the end


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="process start times come from /proc")
def test_a_lock_whose_pid_was_reused_is_taken_over_and_a_live_owner_refuses(tmp_path):
    """A killed run's PID can be given to a later process: the lock records its owner's start time, so a live
    process with that PID but another start is not the owner (and the owner itself is still refused)."""
    import os

    from tsm.errors import TsmError
    from tsm.rundir import RunLock, _start_time

    start = _start_time(os.getpid())
    assert isinstance(start, int) and start > 0
    lock = tmp_path / "run" / LOCK
    said: list[str] = []
    write_lock(tmp_path / "run", os.getpid())  # an old lock without a start time: this live PID owns it
    with pytest.raises(TsmError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run", say=said.append).acquire()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": start}
    lock.write_text(json.dumps(owner))  # the owner, alive, with its own start time: refused
    with pytest.raises(TsmError, match="in use by another tsm train"):
        RunLock(tmp_path / "run", say=said.append).acquire()
    lock.write_text(json.dumps({**owner, "start": start - 1}))  # the PID now names a later process
    with RunLock(tmp_path / "run", say=said.append) as held:
        assert json.loads(lock.read_text()) == held.mine == owner
        assert said == [
            f"took over {lock}: its run (pid {os.getpid()} on {socket.gethostname()}) is no longer running"
        ]
    assert not lock.exists()


def test_a_fresh_run_into_a_run_is_refused_unless_overwrite(finished, assets, tmp_path, capsys):
    cfg, run = copy_of(finished, tmp_path, assets, steps=2)
    before = snapshot(run)
    msg = one_line_error(capsys, "train", cfg)
    assert "--resume" in msg and "train.overwrite=true" in msg and "step_0000004" in msg
    assert snapshot(run) == before
    msg = one_line_error(capsys, "train", cfg, "--resume", "train.overwrite=true")
    assert "--resume" in msg and "train.overwrite" in msg
    code, err = run_cli("train", cfg, "train.overwrite=true")
    out = capsys.readouterr().out
    assert code == 0, err
    assert "deleted" in out and "checkpoints" in out
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]  # only the new run's
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_an_output_dir_that_is_a_file_is_one_line(assets, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    msg = one_line_error(capsys, "train", config(tmp_path / "run.yaml", assets))
    assert "is a file" in msg and str(tmp_path / "run") in msg


# ---------------------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["python", "safetensors"])
def test_a_full_disk_while_checkpointing_is_one_line(library, assets, tmp_path, capsys, monkeypatch):
    """The second checkpoint's write fails as Python raises it (OSError) or as safetensors' writer does."""
    from safetensors import SafetensorError

    import tsm.io
    import tsm.recipes.run

    save, save_file = tsm.recipes.run._save, tsm.io.save_file

    def full_disk(recipe, folder: Path) -> None:
        if folder.name.startswith("step_0000004"):
            (folder / "unet.safetensors").write_bytes(b"\0" * 64)  # half written
            raise OSError(errno.ENOSPC, "No space left on device")
        save(recipe, folder)

    def full_disk_safetensors(tensors, path, metadata=None) -> None:
        if "step_0000004" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, path, metadata=metadata)

    if library == "python":
        monkeypatch.setattr(tsm.recipes.run, "_save", full_disk)
    else:
        monkeypatch.setattr(tsm.io, "save_file", full_disk_safetensors)
    cfg = config(tmp_path / "run.yaml", assets)
    msg = one_line_error(capsys, "train", cfg)
    assert "checkpoint step_0000004" in msg and "no space left on device" in msg
    assert "step_0000002" in msg and "--resume" in msg
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_0000002"]  # no .tmp left
    assert json.loads((ckpts / "step_0000002" / "state.json").read_text())["step"] == 2
    assert load_file(ckpts / "step_0000002" / "unet.safetensors")  # the earlier checkpoint reads
    assert not (tmp_path / "run" / LOCK).exists()


def corrupt(file: Path) -> None:
    if file.name == "recipe.pt":  # a pickle weights_only refuses: torch's advice would be to unpickle it
        torch.save({"state": Path("/etc")}, file)
    elif file.name == "state.json":
        file.write_text('{"step": 4, "hist')
    else:
        file.write_bytes(file.read_bytes()[:100])  # truncated


@pytest.mark.parametrize("name", ["recipe.pt", "state.json", "unet.safetensors"])
def test_a_damaged_checkpoint_file_is_one_line(name, finished, assets, tmp_path, capsys):
    cfg, run = copy_of(finished, tmp_path, assets)
    corrupt(run / "checkpoints" / "step_0000004" / name)
    msg = one_line_error(capsys, "train", cfg, "--resume", "train.steps=6")
    assert f"step_0000004/{name} is damaged" in msg and "continue from step_0000002" in msg
    assert "weights_only" not in msg and "unpickl" not in msg.lower()


def test_a_failed_resume_writes_nothing_and_the_next_one_trains_on(finished, assets, tmp_path, capsys):
    # the run's config.yaml is what the next --resume is checked against: a resume that fails while loading
    # its checkpoint must leave it as it was, or the next one would take the run for finished
    cfg, run = copy_of(finished, tmp_path, assets)
    name = run / "checkpoints" / "step_0000004" / "recipe.pt"
    good = name.read_bytes()
    before = (run / "config.yaml").read_bytes()
    corrupt(name)
    one_line_error(capsys, "train", cfg, "--resume", "train.steps=6")
    assert (run / "config.yaml").read_bytes() == before
    name.write_bytes(good)
    code, err = run_cli("train", cfg, "--resume", "train.steps=6", capsys=capsys)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6


def test_sigterm_writes_a_checkpoint_and_resume_finishes(assets, tmp_path, capsys):
    cfg = config(tmp_path / "run.yaml", assets, steps=40, checkpoint_every=100)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tsm.cli", "train", str(cfg)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # config.yaml is written inside train(), where SIGTERM is handled
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and "--resume" in last and str(cfg) in last
    ckpts = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and not ckpts[0].endswith(".tmp") and not (run / LOCK).exists()
    step = int(ckpts[0].removeprefix("step_"))
    assert 1 <= step < 40
    code, err = run_cli("train", cfg, "--resume", capsys=capsys)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["start"], summary["steps"]) == (step, 40)
