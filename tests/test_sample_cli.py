"""`tsm sample` and validation grids on a tiny SD1.5 run: the run's trigger in the prompts, a progress bar with
its total on stderr, a new folder per call, and one-line errors for bad flags before the model loads."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from tiny_models import write_tiny_model

import tsm.recipes.run as run_module
from tsm.cli import main
from tsm.config import load_config
from tsm.data import write_digits_image_folder

TRIGGER = "xyz"


def write_config(root: Path, assets: dict, name: str, **train) -> Path:
    cfg = {
        "model": {"family": "sd15", "path": str(assets["sd15"])},
        "experts": {"scales": [2, 1], "rank": 2, "alpha": 2},
        "data": {"path": str(assets["images"]), "resolution": 16, "trigger": TRIGGER, "cache": False},
        "train": {
            "steps": 1,
            "batch_size": 2,
            "output_dir": str(root / name),
            "log_with": "none",
            "validation_prompts": ["a digit 3"],
            "validation_seeds": [0, 1],
            "validation_steps": 2,
            **train,
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sample_assets")
    return {
        "root": root,
        "sd15": write_tiny_model("sd15", root / "sd15"),
        "images": write_digits_image_folder(root / "images", n=4, size=16),
    }


@pytest.fixture(scope="module")
def trained(assets) -> dict:
    """One trained run; the validation grid's calls of `sample_run` recorded and its stderr kept."""
    calls, original = [], run_module.sample_run

    def recording(cfg, c, prompts, seeds, *args, **kwargs):
        calls.append({"prompts": list(prompts), "seeds": list(seeds), **kwargs})
        return original(cfg, c, prompts, seeds, *args, **kwargs)

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(run_module, "sample_run", recording)
        run_module.train(load_config(write_config(assets["root"], assets, "run")))
    return {"run": assets["root"] / "run", "calls": calls, "stderr": err.getvalue()}


def sample_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["sample", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------------
def test_the_validation_grid_gets_the_trigger_and_a_progress_bar(trained):
    (call,) = trained["calls"]  # validate_every 0: the final grid only
    assert call["prompts"] == [f"{TRIGGER}, a digit 3"] * 2 and call["seeds"] == [0, 1]
    assert call["desc"] == "validation grid" and call["progress"] is True
    assert "validation grid (2 images, 2 steps)" in trained["stderr"]
    assert "| 0/2 [" in trained["stderr"]  # the bar has its total (and so an ETA)
    assert (trained["run"] / "samples" / "final.png").is_file()


def test_no_progress_means_no_validation_bar(assets, capsys):
    summary = run_module.train(load_config(write_config(assets["root"], assets, "quiet")), progress=False)
    assert summary["grid"] and Path(summary["grid"]).is_file()
    assert "validation grid" not in capsys.readouterr().err


def test_two_calls_write_two_folders_with_the_trigger_and_a_bar(trained, capsys):
    run = trained["run"]
    before = set((run / "samples").glob("sample_*"))
    prompts = ["--prompt", "a cat", "--prompt", f"{TRIGGER}, a dog", "--prompt", ""]
    code, out, err = sample_cli(capsys, run, *prompts, "--seeds", "0", "--steps", "2")
    assert code == 0, err
    assert f"prompts get the run's trigger '{TRIGGER}'" in out
    assert "sampling (3 images, 2 steps)" in err and "| 0/2 [" in err
    code, out2, err = sample_cli(capsys, run, *prompts, "--seeds", "0", "--steps", "2", "--no-trigger")
    assert code == 0, err
    assert "trigger" not in out2
    first, second = sorted(set((run / "samples").glob("sample_*")) - before)
    assert out.strip().splitlines()[-1].endswith(str(first)) and out2.strip().endswith(str(second))
    assert int(second.name[7:]) == int(first.name[7:]) + 1
    # the trigger goes in front as the captions had it, never twice; "" stays the unconditional sample
    assert json.loads((first / "prompts.json").read_text()) == {
        "p00_seed0": f"{TRIGGER}, a cat",
        "p01_seed0": f"{TRIGGER}, a dog",
        "p02_seed0": "",
    }
    assert json.loads((second / "prompts.json").read_text()) == {
        "p00_seed0": "a cat",
        "p01_seed0": f"{TRIGGER}, a dog",
        "p02_seed0": "",
    }
    for folder in (first, second):
        assert sorted(p.name for p in folder.glob("*.png")) == [
            "grid.png",
            "p00_seed0.png",
            "p01_seed0.png",
            "p02_seed0.png",
        ]
    assert (run / "samples" / "final.png").is_file()  # the validation grid is not in the way


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "-3"], "--steps must be at least 1, got -3"),
        (["--seeds"], "--seeds needs at least one seed"),
        (["--seeds", "0", "-1"], "--seeds must be whole numbers from 0 to 2**64 - 1, got -1"),
        (["--seeds", "1", "2", "1"], "--seeds has 1 twice"),
        (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--guidance", "nan"], "got nan"),
        (["--guidance", "inf"], "got inf"),
        (["--width", "4"], "--width must be at least 8 pixels, got 4"),
        (["--resolution", "0"], "--resolution must be at least 8 pixels, got 0"),
        (["--resolution", "17"], "sd15 samples sizes that are multiples of 2 pixels, got 17x17"),  # VAE x2
        (["--height", "32", "--width", "33"], "use e.g. 32 instead of 33"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device; use cuda, cuda:1 or cpu"),
    ],
)
def test_bad_flags_are_one_line_errors(trained, capsys, flags, message):
    before = sorted((trained["run"] / "samples").iterdir())
    code, out, err = sample_cli(capsys, trained["run"], *flags)
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tsm sample: error: ") and message in lines[0], err
    assert sorted((trained["run"] / "samples").iterdir()) == before  # no folder for a failed call


def test_an_empty_prompt_list_is_a_one_line_error(assets, trained, capsys):
    cfg = yaml.safe_load((trained["run"] / "config.yaml").read_text())
    cfg["train"]["validation_prompts"] = []
    bare = assets["root"] / "bare"
    bare.mkdir(exist_ok=True)
    (bare / "config.yaml").write_text(yaml.safe_dump(cfg))
    for f in trained["run"].glob("*.safetensors"):
        (bare / f.name).write_bytes(f.read_bytes())
    code, _, err = sample_cli(capsys, bare)
    assert code == 2 and err.strip().endswith(
        "has no train.validation_prompts; pass --prompt (repeat for more)"
    )
