"""Every config key is read by the code, and changing it changes something observable.

The static half parses tsm/ with `ast`: each field of each config section must be read as an attribute of
that section somewhere (``cfg.data.num_workers``, ``o.lr_power`` after ``o = cfg.optim``, ``cfg.path`` in a
function taking a ``DataConfig``), or, for ``objective``, be a keyword of the objectives' ``from_scheduler``
(the section reaches them as ``dataclasses.asdict(cfg.objective)``). tsm/config.py's dataclasses and its
``validate`` do not count as readers. The behavioural half sets each key on the built-in digits model (and a
tiny SD3 folder for the flow-only keys) and looks at what changed: the objective's draws and losses, the
dataset's items, the DataLoader, and short ``tsm train`` runs (their logged lr, adapters, logs, batches).
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import write_tiny_model

import tsm
import tsm.config as C
from tsm.config import load_config

ROOT = Path(tsm.__file__).parent
SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(C.Config)}
SECTIONS = {name: getattr(C, cls) if isinstance(cls, str) else cls for name, cls in SECTIONS.items()}
CLASS_SECTION = {cls.__name__: name for name, cls in SECTIONS.items()}


# ---------------------------------------------------------------------------------------------------------
# static: every key has a reader
# ---------------------------------------------------------------------------------------------------------
def _reader_nodes(path: Path) -> list[ast.AST]:
    """The parts of a file that count as readers: all of it, except config.py's sections and validate."""
    tree = ast.parse(path.read_text(), str(path))
    if path != ROOT / "config.py":
        return [tree]
    skip = {*CLASS_SECTION, "Config", "validate"}
    return [n for n in tree.body if not (isinstance(n, ast.ClassDef | ast.FunctionDef) and n.name in skip)]


def _section_reads(node: ast.AST) -> set[tuple[str, str]]:
    """(section, field) pairs read in ``node``: ``<x>.<section>.<field>``, or ``<name>.<field>`` where, in the
    same function, ``name = <x>.<section>`` or ``name: <Section>Config`` is a parameter."""
    reads: set[tuple[str, str]] = set()
    scopes = [node, *(n for n in ast.walk(node) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))]
    for scope in scopes:
        alias: dict[str, str] = {}
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
            a = scope.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                hint = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                for cls, section in CLASS_SECTION.items():
                    if cls in hint:
                        alias[arg.arg] = section
        for n in ast.walk(scope):
            if isinstance(n, ast.Assign) and len(n.targets) == 1:
                pairs = [(n.targets[0], n.value)]
                if isinstance(n.targets[0], ast.Tuple) and isinstance(n.value, ast.Tuple):
                    pairs = list(zip(n.targets[0].elts, n.value.elts, strict=False))
                for target, value in pairs:
                    if isinstance(target, ast.Name) and isinstance(value, ast.Attribute):
                        if value.attr in SECTIONS:
                            alias[target.id] = value.attr
        for n in ast.walk(scope):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
                owner = n.value
                if isinstance(owner, ast.Attribute) and owner.attr in SECTIONS:
                    reads.add((owner.attr, n.attr))
                elif isinstance(owner, ast.Name) and owner.id in alias:
                    reads.add((alias[owner.id], n.attr))
    return reads


def _from_scheduler_keywords() -> set[str]:
    tree = ast.parse((ROOT / "objectives.py").read_text())
    names: set[str] = set()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for cls in ("FlowMatchingObjective", "DDPMObjective"):
        (fn,) = [
            n for n in classes[cls].body if isinstance(n, ast.FunctionDef) and n.name == "from_scheduler"
        ]
        names |= {a.arg for a in [*fn.args.args[2:], *fn.args.kwonlyargs]}  # after cls, scheduler
    return names


def _objective_passed_as_keywords() -> bool:
    """Somewhere ``asdict(<x>.objective)`` is built (what turns the section into from_scheduler keywords)."""
    for path in ROOT.rglob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Call) and ast.unparse(n.func).split(".")[-1] == "asdict" and n.args:
                arg = n.args[0]
                if isinstance(arg, ast.Attribute) and arg.attr == "objective":
                    return True
    return False


def test_every_config_key_is_read_somewhere():
    reads: set[tuple[str, str]] = set()
    for path in sorted(ROOT.rglob("*.py")):
        for node in _reader_nodes(path):
            reads |= _section_reads(node)
    keywords = _from_scheduler_keywords() if _objective_passed_as_keywords() else set()
    unread = [
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if (section, f.name) not in reads and not (section == "objective" and f.name in keywords)
    ]
    assert not unread, "config keys nothing in tsm/ reads (outside config.py's validate):\n" + "\n".join(
        unread
    )


def test_the_reader_scan_finds_the_usual_forms():
    found = set()
    for path in sorted(ROOT.rglob("*.py")):
        for node in _reader_nodes(path):
            found |= _section_reads(node)
    assert ("data", "num_workers") in found  # cfg.data.num_workers
    assert ("optim", "lr_power") in found  # cfg.optim.lr_power
    assert ("train", "batch_per_expert") in found  # tc.batch_per_expert, tc = self.cfg.train
    assert ("data", "center_crop") in found  # cfg.center_crop with cfg: DataConfig
    assert {f.name for f in dataclasses.fields(C.ObjectiveConfig)} <= _from_scheduler_keywords()


# ---------------------------------------------------------------------------------------------------------
# behaviour: the objective
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory) -> Path:
    return write_tiny_model("sd3", tmp_path_factory.mktemp("keys") / "sd3")  # FlowMatchEuler(shift=3.0)


def objective(family: str, sd3_path: Path, *overrides: str):
    from tsm.recipes.run import load_components

    path = '""' if family == "digits" else str(sd3_path)
    cfg = load_config(None, [f"model.family={family}", f"model.path={path}", *overrides])
    return load_components(cfg).objective


def draws(obj) -> torch.Tensor:
    return obj.sample_t(2000, torch.Generator().manual_seed(0)).float()


@pytest.mark.parametrize(
    "family, base, change",
    [
        ("digits", [], "objective.weighting=logit_normal"),  # digits' default: none (uniform)
        ("digits", [], "objective.weighting=mode"),
        ("sd3", [], "objective.weighting=none"),  # sd3's default: logit_normal
        ("digits", ["objective.weighting=logit_normal"], "objective.logit_mean=1.0"),
        ("digits", ["objective.weighting=logit_normal"], "objective.logit_std=2.0"),
        ("sd3", [], "objective.logit_mean=-1.0"),
        ("sd3", [], "objective.logit_std=0.5"),
        ("digits", ["objective.weighting=mode"], "objective.mode_scale=0.5"),
        ("sd3", ["objective.weighting=mode"], "objective.mode_scale=0.5"),
        ("sd3", [], "objective.shift=1.0"),  # the scheduler's: 3.0
    ],
)
def test_objective_key_changes_the_timestep_draws(family, base, change, sd3_path):
    a = draws(objective(family, sd3_path, *base))
    b = draws(objective(family, sd3_path, *base, change))
    assert not torch.equal(a, b), f"{change} did not change sample_t on {family}"


def test_objective_shift_equal_to_the_schedulers_changes_nothing(sd3_path):
    a, b = draws(objective("sd3", sd3_path)), draws(objective("sd3", sd3_path, "objective.shift=3.0"))
    torch.testing.assert_close(a, b, atol=1e-2, rtol=0)


def fixed_tensors(continuous: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    pred, x0, noise = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([100.0, 400.0, 700.0, 950.0]) if continuous else torch.tensor([10, 300, 600, 990])
    return pred, x0, noise, t


@pytest.mark.parametrize(
    "family, change",
    [
        ("digits", "objective.min_snr_gamma=5.0"),
        ("sd3", "objective.weighting=cosmap"),
        ("sd3", "objective.weighting=sigma_sqrt"),
    ],
)
def test_objective_key_changes_the_loss(family, change, sd3_path):
    a, b = objective(family, sd3_path), objective(family, sd3_path, change)
    args = fixed_tensors(a.continuous)
    assert not torch.equal(a.loss(*args), b.loss(*args)), f"{change} did not change the loss on {family}"


@pytest.mark.parametrize("family", ["digits", "sd3"])
def test_noise_offset_changes_the_noise(family, sd3_path):
    a, b = objective(family, sd3_path), objective(family, sd3_path, "objective.noise_offset=0.1")
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    assert not torch.equal(a.draw_noise((3, 8, 8), gens()), b.draw_noise((3, 8, 8), gens()))


# ---------------------------------------------------------------------------------------------------------
# behaviour: the data
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    from tsm.bench.digits_data import write_folder

    return write_folder(tmp_path_factory.mktemp("keys") / "digits", "source", n=16)  # 8x8, "digit 3"


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """Non-square images: a square image resized to the resolution leaves nothing to crop."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("keys") / "wide"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 14, 3), dtype=np.uint8)).save(root / f"w{i}.png")
        (root / f"w{i}.txt").write_text("digit 1\n")
    return root


def items(path: Path, *overrides: str, seed: int = 0, epoch: int = 0) -> list[dict]:
    from tsm.data import load_dataset

    cfg = load_config(None, [f"data.path={path}", "data.resolution=8", *overrides])
    ds = load_dataset(cfg.data, video=False, seed=seed)
    return [ds[(i, epoch)] for i in range(len(ds))]


def differ(a: list[dict], b: list[dict]) -> list[int]:
    """The items whose pixels or caption differ."""
    return [
        i
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if x["caption"] != y["caption"]
        or x["pixels"].shape != y["pixels"].shape
        or not torch.equal(x["pixels"], y["pixels"])
    ]


def test_caption_dropout_empties_some_captions(digits_dir):
    a, b = items(digits_dir), items(digits_dir, "data.caption_dropout=0.5")
    assert all(x["caption"] for x in a)
    dropped = [i for i, x in enumerate(b) if x["caption"] == ""]
    assert 0 < len(dropped) < len(b)
    assert all(b[i]["caption"] == a[i]["caption"] for i in range(len(b)) if i not in dropped)


def test_random_flip_mirrors_some_items(digits_dir):
    a, b = items(digits_dir), items(digits_dir, "data.random_flip=true")
    flipped = differ(a, b)
    assert 0 < len(flipped) < len(a)
    assert all(torch.equal(b[i]["pixels"], a[i]["pixels"].flip(-1)) for i in flipped)


def test_center_crop_off_crops_elsewhere(wide_dir):
    a, b = items(wide_dir), items(wide_dir, "data.center_crop=false")
    assert differ(a, b)


def test_resolution_changes_the_pixels(digits_dir):
    a, b = items(digits_dir), items(digits_dir, "data.resolution=4")
    assert a[0]["pixels"].shape == (3, 8, 8) and b[0]["pixels"].shape == (3, 4, 4)


def test_seed_and_epoch_change_the_draws(digits_dir):
    flip = "data.random_flip=true"
    assert differ(items(digits_dir, flip, seed=0), items(digits_dir, flip, seed=1))
    assert differ(items(digits_dir, flip, epoch=0), items(digits_dir, flip, epoch=1))
    assert not differ(items(digits_dir, flip, seed=1, epoch=1), items(digits_dir, flip, seed=1, epoch=1))


def test_num_workers_reaches_the_loader_and_changes_no_batch(digits_dir):
    from tsm.data import load_dataset, step_loader

    batches = {}
    for workers in (0, 2):
        cfg = load_config(
            None,
            [
                f"data.path={digits_dir}",
                "data.resolution=8",
                "data.random_flip=true",
                "data.caption_dropout=0.3",
                f"data.num_workers={workers}",
                "train.seed=5",
            ],
        )
        ds = load_dataset(cfg.data, video=False, seed=cfg.train.seed)
        loader = step_loader(ds, cfg, batch=4, micro=4, local=4, rank=0, total=6)(0)  # 24 samples: 2 epochs
        assert loader.num_workers == workers
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 6
    for x, y in zip(batches[0], batches[2], strict=True):
        assert x["captions"] == y["captions"] and x["keys"] == y["keys"]
        assert torch.equal(x["pixels"], y["pixels"])


# ---------------------------------------------------------------------------------------------------------
# behaviour: short `tsm train` runs on the digits model
# ---------------------------------------------------------------------------------------------------------
RUNS = {
    "base": [],
    "base_again": [],
    "lr_scheduler": ["optim.lr_scheduler=linear"],
    "warmup_steps": ["optim.warmup_steps=2"],
    "cycles_1": ["optim.lr_scheduler=cosine_with_restarts"],
    "cycles_2": ["optim.lr_scheduler=cosine_with_restarts", "optim.lr_num_cycles=2"],
    "power_1": ["optim.lr_scheduler=polynomial"],
    "power_2": ["optim.lr_scheduler=polynomial", "optim.lr_power=2"],
    "ema_decay": ["optim.ema_decay=0.5"],
    "log_with": ["train.log_with=none"],
    "batch_per_expert": ["train.batch_per_expert=true"],
}
LR = 1e-3
END = 1e-7  # diffusers' polynomial schedule decays to lr_end = 1e-7


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir) -> dict[str, dict]:
    """Every run of RUNS (2 steps of foster, 3 experts, batch 4), with what it logged and loaded."""
    import accelerate

    import tsm.data
    from tsm.cli import main

    root = tmp_path_factory.mktemp("runs")
    cfg = {
        "model": {"family": "digits", "path": ""},
        "experts": {
            "scales": [2, 1],
            "rank": 2,
            "targets": ["to_q", "to_k", "to_v", "to_out.0"],
            "text_targets": [],
        },
        "data": {"path": str(digits_dir), "resolution": 8, "cache": False},
        "optim": {"lr": LR, "weight_decay": 0.0},
        "train": {
            "method": "foster",
            "steps": 2,
            "batch_size": 4,
            "seed": 3,
            "log_every": 1,
            "log_with": "tensorboard",
            "checkpoint_every": 1000,
            "validation_prompts": [],
        },
    }
    config = root / "digits.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out: dict[str, dict] = {}
    record: dict = {}
    log, load_dataset, collate = accelerate.Accelerator.log, tsm.data.load_dataset, tsm.data.collate

    def logged(self, values, step=None, log_kwargs=None):
        record["logged"].append((step, dict(values)))
        return log(self, values, step=step, log_kwargs=log_kwargs or {})

    def loaded(*args, **kwargs):
        record["dataset"] = load_dataset(*args, **kwargs)
        return record["dataset"]

    def collated(batch):
        record["batch_sizes"].append(len(batch))
        return collate(batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accelerate.Accelerator, "log", logged)
        mp.setattr(tsm.data, "load_dataset", loaded)
        mp.setattr(tsm.data, "collate", collated)
        for name, overrides in RUNS.items():
            record.clear()
            record.update(logged=[], batch_sizes=[])
            run = root / name
            assert main(["train", str(config), f"train.output_dir={run}", *overrides]) == 0, name
            out[name] = {
                **record,
                "run": run,
                "lr": [values["train/lr"] for _, values in record["logged"]],
                "adapters": load_file(run / "unet.safetensors"),
                "summary": json.loads((run / "summary.json").read_text()),
            }
    return out


def same_adapters(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runs_are_deterministic_and_train(runs):
    base = runs["base"]
    assert base["summary"]["steps"] == 2 and base["summary"]["grid"] is None
    assert same_adapters(base["adapters"], runs["base_again"]["adapters"])
    assert any(v.abs().sum() > 0 for k, v in base["adapters"].items() if ".lora_B." in k)


def test_the_runs_seed_reaches_the_dataset(runs):
    assert runs["base"]["dataset"].seed == 3


@pytest.mark.parametrize(
    "base, changed, want_base, want_changed",
    [
        ("base", "lr_scheduler", [LR, LR], [LR / 2, 0.0]),  # linear over 2 steps
        ("base", "warmup_steps", [LR, LR], [LR / 2, LR]),
        ("cycles_1", "cycles_2", [LR / 2, 0.0], [LR, 0.0]),  # 2 hard restarts: step 1 starts a new cycle
        ("power_1", "power_2", [(LR - END) / 2 + END, END], [(LR - END) / 4 + END, END]),
    ],
    ids=["lr_scheduler", "warmup_steps", "lr_num_cycles", "lr_power"],
)
def test_lr_keys_change_the_logged_lr(runs, base, changed, want_base, want_changed):
    # the lr logged after step s is the scheduler's lr after s steps (diffusers' scripts log the same)
    got_base, got_changed = runs[base]["lr"], runs[changed]["lr"]
    assert got_base == pytest.approx(want_base, abs=1e-9)
    assert got_changed == pytest.approx(want_changed, abs=1e-9)
    assert got_base != got_changed


def test_ema_decay_changes_the_final_adapters(runs):
    assert not same_adapters(runs["base"]["adapters"], runs["ema_decay"]["adapters"])
    # the last checkpoint holds the raw adapters, the final file the averaged ones
    ckpt = load_file(runs["ema_decay"]["run"] / "checkpoints" / "step_0000002" / "unet.safetensors")
    assert same_adapters(ckpt, runs["base"]["adapters"])


def test_log_with_none_writes_no_tracker_logs(runs):
    events = lambda name: list((runs[name]["run"] / "logs").rglob("events.out.tfevents*"))  # noqa: E731
    assert events("base") and runs["base"]["logged"]
    assert not events("log_with") and not runs["log_with"]["logged"]
    assert same_adapters(runs["base"]["adapters"], runs["log_with"]["adapters"])


def test_batch_per_expert_gives_every_expert_a_batch(runs):
    assert runs["base"]["batch_sizes"] == [4, 4]
    assert runs["batch_per_expert"]["batch_sizes"] == [12, 12]  # 3 experts (scales [2, 1]) x batch_size 4
