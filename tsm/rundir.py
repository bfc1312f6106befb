"""The run directory of `tsm train`: one run per folder, a ``--resume`` that trains the same run, faults.

    RUN/run.lock                  the live run's PID and host (O_CREAT | O_EXCL; removed at the end)
    RUN/config.yaml               what the run trains; ``--resume`` refuses a config that trains another run
    RUN/checkpoints/step_N/       state.json (step, history), recipe.pt (optimizers), <module>.safetensors
    RUN/checkpoints/step_N.tmp/   a checkpoint being written; left by a crash, removed at the next start

Every refusal is one line (`TsmError`) saying what is wrong and what to do. `tsm.recipes.run.train` calls
`RunLock`, `start_point` and `StopOnSignal`; `write_failed`, `read_checkpoint_file` and `check_safetensors`
turn a full disk or a damaged file into one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tsm.config import Config
from tsm.errors import TsmError

CHECKPOINTS = "checkpoints"
STATE = "state.json"
LOCK = "run.lock"
SUMMARY = "summary.json"
# what a fresh run (and train.overwrite=true) replaces; the latent cache is kept: it depends on the data only
RUN_OUTPUTS = (CHECKPOINTS, "samples", "logs", SUMMARY, "loss.png", "config.yaml")

# keys --resume may change: how long, how often to save/log/validate, how to load data. Every other key
# changes what is trained (model, experts, data, objective, optimizer, method, seed, batch): refused.
RESUMABLE = frozenset(
    {
        "train.steps",
        "train.checkpoint_every",
        "train.keep_last",
        "train.log_every",
        "train.log_with",
        "train.validate_every",
        "train.validation_prompts",
        "train.validation_seeds",
        "train.validation_steps",
        "train.guidance_scale",
        "train.overwrite",
        "train.output_dir",  # the run folder moved or copied: it is where we are
        "train.gradient_checkpointing",  # memory against time; the same gradients
        "train.offload_inactive",  # memory against time; the same computation on the same weights
        "data.num_workers",
        "data.cache_dir",
    }
)


# ---------------------------------------------------------------------------------------------------------
# --resume: the saved config against the new one
# ---------------------------------------------------------------------------------------------------------
def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in d.items() if isinstance(values, dict) for k, v in values.items()}


def config_changes(saved: dict[str, Any], cfg: Config) -> tuple[list[str], list[str]]:
    """(refused, applied): each ``"key old -> new"`` where ``cfg`` differs from the saved config (nested dicts
    as in config.yaml); a key the saved file lacks (written by an older tsm) counts as its default."""
    old = {**_flat(Config().to_dict()), **_flat(saved)}
    refused, applied = [], []
    for key, value in _flat(cfg.to_dict()).items():
        if key in old and old[key] != value:
            (applied if key in RESUMABLE else refused).append(f"{key} {old[key]!r} -> {value!r}")
    return refused, applied


def _check_steps(saved: dict[str, Any], cfg: Config, step: int) -> None:
    """``train.steps`` may grow; refused where the checkpoint is already past the new end or a stage boundary
    that train.steps places (assembling after train.steps; warm start over round(fraction x steps))."""
    old = int(_flat(saved).get("train.steps", cfg.train.steps))
    new, tc = cfg.train.steps, cfg.train
    if new == old:
        return
    assembling = tc.assemble_steps if tc.method in ("distill", "glance") else 0
    if new + assembling < step:
        raise TsmError(
            f"train.steps={new} ends before the checkpoint's step {step}; pass train.steps >= "
            f"{step - assembling} to resume (or start a new run in another train.output_dir)"
        )
    if assembling and step > min(old, new):
        raise TsmError(
            f"train.steps {old} -> {new} moves where assembling starts, and the checkpoint (step {step}) is "
            f"past it; resume with train.steps={old}"
        )
    f = tc.warm_start_fraction
    if f > 0 and round(f * old) != round(f * new) and step > min(round(f * old), round(f * new)):
        raise TsmError(
            f"train.steps {old} -> {new} moves the warm start's end (train.warm_start_fraction={f}) and the "
            f"checkpoint (step {step}) is past it; resume with train.steps={old}"
        )


# ---------------------------------------------------------------------------------------------------------
# where a run starts
# ---------------------------------------------------------------------------------------------------------
def complete_checkpoints(run: Path) -> list[Path]:
    """checkpoints/step_N/ folders that were renamed into place (state.json written last), oldest first."""
    root = run / CHECKPOINTS
    return sorted(p for p in root.glob("step_*") if p.suffix != ".tmp" and (p / STATE).is_file())


def _before(ckpt: Path) -> str:
    """What to do when ``ckpt`` cannot be read: resume from the checkpoint before it, or start over."""
    earlier = [p for p in complete_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    if earlier:
        return f"delete {ckpt} and run --resume again to continue from {earlier[-1].name}"
    return (
        f"no earlier checkpoint is left: delete {ckpt} and resume from step 0, or start over with "
        "train.overwrite=true"
    )


def damaged(path: Path, reason: str) -> TsmError:
    """The one line for a file of checkpoints/step_N/ that cannot be read."""
    return TsmError(f"{path} is damaged ({reason}); {_before(path.parent)}")


def read_checkpoint_file(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, a failure (missing, truncated, not the format, a pickle torch refuses) as one line:
    never torch's own advice, which is to unpickle the file."""
    if not path.is_file():
        raise TsmError(f"{path} is missing: the checkpoint is incomplete; {_before(path.parent)}")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            return read(path)
    except TsmError:
        raise
    except Exception as e:  # UnpicklingError, RuntimeError (zip), JSONDecodeError, SafetensorError, OSError
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""  # its first sentence
        if "weights_only" in str(e) or "pickl" in f"{type(e).__name__} {e}".lower():
            reason = "not a tensor-only torch file"  # torch's message would advise loading it unsafely
        else:
            reason = f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__
        raise damaged(path, reason) from None


def check_safetensors(path: Path) -> None:
    """Raise `damaged` when ``path`` does not read as safetensors (called when loading it failed: a readable
    file that does not fit the model is another error, and the caller re-raises that one)."""
    from safetensors.torch import load_file

    read_checkpoint_file(path, load_file)


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json of a checkpoint: ``{"step": N, "history": [...], "curves": {...}}``."""
    state = read_checkpoint_file(ckpt / STATE, lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "history" not in state:
        raise damaged(ckpt / STATE, "no step or history")
    return state


@dataclass
class Start:
    """Where `train` starts: a checkpoint (None: step 0), its state, the resumable keys that changed, and the
    summary of a run that had already finished (nothing to train: the run is left as it is)."""

    checkpoint: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    finished: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        return self.state.get("step", 0)


def start_point(run: Path, cfg: Config, resume: bool) -> Start:
    """Read-only checks (every process runs them, so that all refuse alike): a fresh run into a folder that
    holds checkpoints, ``--resume`` with ``train.overwrite``, a config that would train another run."""
    ckpts = complete_checkpoints(run)
    if not resume:
        if ckpts and not cfg.train.overwrite:
            raise TsmError(
                f"{run} already holds a run (checkpoints up to {ckpts[-1].name}); continue it with --resume, "
                "start over with train.overwrite=true (deletes it), or choose another train.output_dir"
            )
        return Start()
    if cfg.train.overwrite:
        raise TsmError(
            f"--resume continues the run in {run} and train.overwrite=true would delete it; pass one of them "
            "(train.overwrite=false to resume)"
        )
    if not ckpts:
        return Start()
    if not (run / "config.yaml").is_file():
        raise TsmError(
            f"{run} has checkpoints but no config.yaml, so --resume cannot check that it trains the same "
            "run; restore config.yaml, or start over with train.overwrite=true"
        )
    try:
        saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (yaml.YAMLError, OSError) as e:
        raise TsmError(
            f"{run / 'config.yaml'} cannot be read ({type(e).__name__}); restore it to resume"
        ) from None
    refused, applied = config_changes(saved if isinstance(saved, dict) else {}, cfg)
    if refused:
        raise TsmError(
            f"--resume would train another run than {run}: {', '.join(refused)}; resume with the run's "
            "values (its config.yaml), or start a new run in another train.output_dir"
        )
    state = read_state(ckpts[-1])
    _check_steps(saved, cfg, state["step"])
    start = Start(ckpts[-1], state, applied)
    summary = run / SUMMARY
    steps_kept = not any(a.startswith("train.steps ") for a in applied)
    if steps_kept and summary.is_file():
        with contextlib.suppress(ValueError, OSError):
            done = json.loads(summary.read_text())
            if isinstance(done, dict) and done.get("steps") == state["step"]:
                start.finished = done
    return start


# ---------------------------------------------------------------------------------------------------------
# the folder: created, cleaned, cleared
# ---------------------------------------------------------------------------------------------------------
def make_run_dir(run: Path) -> None:
    """Create ``train.output_dir``; an existing file there (or a file above it) is one line."""
    if run.exists() and not run.is_dir():
        raise TsmError(f"train.output_dir {run} is a file, not a folder; choose another train.output_dir")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TsmError(
            f"cannot create train.output_dir {run} ({_reason(e)}); choose another folder"
        ) from None


def clean_partial(run: Path) -> list[Path]:
    """Remove what a killed run left half-written: checkpoints/step_N.tmp/, io's ``.<name>.*.tmp`` files."""
    leftovers = [p for p in (run / CHECKPOINTS).glob("step_*.tmp") if p.is_dir()]
    leftovers += [p for p in run.glob(".*.tmp") if p.is_file()]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


def clear_run(run: Path) -> list[str]:
    """train.overwrite=true: delete the previous run's files (checkpoints, samples, logs, summary, adapters);
    returns their names."""
    gone = [p for p in (run / name for name in RUN_OUTPUTS) if p.exists()]
    gone += sorted(run.glob("*.safetensors"))  # the final adapters, one per module
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return [p.name for p in gone]


# ---------------------------------------------------------------------------------------------------------
# faults while writing
# ---------------------------------------------------------------------------------------------------------
def os_error_of(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or the errno that safetensors' Rust writer puts in its message
    ("I/O error: No space left on device (os error 28)"); None for anything else."""
    if isinstance(e, OSError):
        return e
    found = re.search(r"os error (\d+)|code: (\d+)", str(e))
    if found:
        code = int(found.group(1) or found.group(2))
        return OSError(code, os.strerror(code))
    return None


def _reason(e: OSError) -> str:
    if e.errno is not None and e.errno in errno.errorcode:
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


@contextlib.contextmanager
def writing(what: str, run: Path, partial: Path | None = None) -> Iterator[None]:
    """Turn an OSError raised inside (however the library wraps it) into `write_failed`'s one line; on any
    failure ``partial`` (a folder being written) is removed first."""
    try:
        yield
    except BaseException as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        fault = None if isinstance(e, TsmError) else os_error_of(e)
        if fault is None:
            raise
        raise write_failed(what, fault, run) from None


def write_failed(what: str, e: OSError, run: Path) -> TsmError:
    """The one line for a failed write: what failed, the last complete checkpoint, what to do."""
    ckpts = complete_checkpoints(run)
    if ckpts:
        where = f"the last complete checkpoint is {ckpts[-1]}; free space (or fix the cause), then --resume"
    else:
        where = "no checkpoint was written yet; free space (or fix the cause) and start again"
    return TsmError(f"writing {what} failed: {_reason(e)}; {where}")


# ---------------------------------------------------------------------------------------------------------
# one run per folder
# ---------------------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat's field 22), or None where /proc does
    not say (no such process, not Linux). With the PID it names one process: a PID reused by a later process
    has a later start."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # the fields after "(comm)", from field 3 on
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """``RUN/run.lock`` (``{"pid", "host", "start"}``), held for the duration of a run by its main process only.

    A second live run is refused with the owner's PID; a lock whose process is gone (on this host) is taken
    over and said so. ``start`` is the owner's process start time where the system tells it (Linux): a lock
    whose PID now belongs to a process that started at another time is the lock of a run that is gone, and is
    taken over too. A lock from another host cannot be checked: refused, naming the file to delete.
    """

    def __init__(
        self,
        run: Path,
        say: Callable[[str], None] = print,
        kind: str = "tsm train",
        elsewhere: str = "choose another train.output_dir",
    ) -> None:
        self.path, self.say, self.kind, self.elsewhere = run / LOCK, say, kind, elsewhere
        self.mine: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
        start = _start_time(os.getpid())
        if start is not None:
            self.mine["start"] = start

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.mine))
        return True

    def _owner(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads(self.path.read_text())
            if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
                return owner
        return None

    def acquire(self) -> None:
        for _ in range(3):  # a lock released between our two looks: try again
            if self._create():
                return
            owner = self._owner()
            if owner is None:
                if not self.path.exists():
                    continue
                raise TsmError(
                    f"{self.path} exists but names no process; if no {self.kind} runs in {self.path.parent}, "
                    "delete it and start again"
                )
            pid, host = owner["pid"], owner.get("host", "?")
            if host != self.mine["host"]:
                raise TsmError(
                    f"{self.path.parent} is in use by pid {pid} on host {host} ({LOCK}); wait for that run "
                    f"to end, or if it is gone delete {self.path}"
                )
            if _alive(pid) and not self._reused(owner):
                raise TsmError(
                    f"{self.path.parent} is in use by another {self.kind} (pid {pid}, {LOCK}); wait for it to "
                    f"end or {self.elsewhere}"
                )
            if self._owner() == owner:  # still the dead owner's lock: take it over
                self.path.unlink(missing_ok=True)
                if self._create():
                    self.say(f"took over {self.path}: its run (pid {pid} on {host}) is no longer running")
                    return
        raise TsmError(
            f"{self.path} keeps changing: another run is starting in {self.path.parent}; wait for it"
        )

    @staticmethod
    def _reused(owner: dict[str, Any]) -> bool:
        """True when the owner's PID now names a process that started at another time than the owner."""
        start = owner.get("start")
        return isinstance(start, int) and _start_time(owner["pid"]) not in (None, start)

    def release(self) -> None:
        if self._owner() == self.mine:  # never remove a lock that another run took over
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------------
# SIGTERM: finish the step, write a checkpoint, stop
# ---------------------------------------------------------------------------------------------------------
class Stopped(TsmError):
    """A run stopped by a signal after writing a checkpoint (the CLI exits 128 + signum; with several
    processes every one raises it, and the main process says so)."""

    def __init__(self, signum: int, step: int, checkpoint: Path, main_process: bool = True) -> None:
        self.signum, self.step, self.checkpoint, self.main_process = signum, step, checkpoint, main_process
        self.signal_name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {self.signal_name} after step {step}; checkpoint {checkpoint} written; "
            "continue with: tsm train CONFIG --resume"
        )


class StopOnSignal:
    """While the context is open, SIGTERM (what a cluster sends before it kills) sets ``requested`` instead of
    ending the process, so that the loop can write a checkpoint first. The previous handler is restored on
    exit: `train` runs many times in one process (the benchmark, tests). Off the main thread (where Python
    cannot install handlers) it does nothing."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum, self.requested, self.installed = signum, False, False
        self.previous: Any = None
        self.pid = os.getpid()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked data-loader worker: end as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(self.signum, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(self.signum, signal.SIG_DFL if self.previous is None else self.previous)
            self.installed = False


@contextlib.contextmanager
def run_guard(run: Path, main_process: bool, say: Callable[[str], None]) -> Iterator[StopOnSignal]:
    """The folder made and locked (main process only), and SIGTERM turned into a request to stop."""
    with StopOnSignal() as stop:
        if not main_process:
            yield stop
            return
        make_run_dir(run)
        with RunLock(run, say):
            yield stop
