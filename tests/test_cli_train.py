"""`tsm train / sample / export / info` end to end on tiny models loaded through from_pretrained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import kill_when, subprocess_env, write_digit_clips, write_tiny_model

import tsm
from tsm.cli import main
from tsm.data import write_digits_image_folder

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
FAMILIES = ["sd15", "pixart", "sd3", "video3d"]
DENOISER = {"sd15": "unet", "video3d": "unet", "pixart": "transformer", "sd3": "transformer"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("assets")
    out = {f: write_tiny_model(f, root / f) for f in FAMILIES}
    out["images"] = write_digits_image_folder(root / "images", n=6, size=16)
    out["clips"] = write_digit_clips(root / "clips", n=4, frames=2, size=16)
    return out


def write_config(path: Path, family: str, assets: dict, **sections) -> Path:
    cfg = {
        "model": {"family": family, "path": str(assets[family])},
        "experts": {"scales": [4, 1], "rank": 2, "alpha": 2},
        "data": {
            "path": str(assets["clips" if family == "video3d" else "images"]),
            "resolution": 16,
            "num_frames": 2,
        },
        "optim": {"lr": 1e-3},
        "train": {
            "steps": 4,
            "batch_size": 4,
            "checkpoint_every": 2,
            "output_dir": str(path.parent / path.stem),
            "validation_prompts": ["a digit 3"],
            "validation_seeds": [0, 1],
            "validation_steps": 2,
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*argv: str, capsys=None) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_three_methods_write_their_files(family, assets, tmp_path, capsys):
    den = DENOISER[family]
    runs = {}
    for method in ("lora", "foster", "assemble"):
        extra = {"method": method}
        if method == "assemble":
            extra["experts_from"] = str(runs["foster"])
        cfg = write_config(tmp_path / f"{method}.yaml", family, assets, train=extra)
        code, err = run_cli("train", cfg, capsys=capsys)
        assert code == 0, err
        run = tmp_path / method
        runs[method] = run
        for name in (f"{den}.safetensors", "config.yaml", "loss.png", "summary.json", "samples/final.png"):
            assert (run / name).is_file(), name
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
        assert list((run / "logs").rglob("events.out.tfevents.*"))
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN

    lora, foster = (load_file(runs[m] / f"{den}.safetensors") for m in ("lora", "foster"))
    assert {k.rsplit(".", 1)[1] for k in lora if ".lora_A." in k} == {"s0_i0"}  # n = 1
    assert {k.rsplit(".", 1)[1] for k in foster if ".lora_A." in k} == {
        "s0_i0",
        "s0_i1",
        "s0_i2",
        "s0_i3",
        "s1_i0",
    }
    assembled = load_file(runs["assemble"] / f"{den}.safetensors")
    for k, v in foster.items():  # assembling froze the experts and trained the routers
        if ".router." in k:
            assert not torch.equal(assembled[k], v), k
        else:
            assert torch.equal(assembled[k], v), k
    text = {"sd15": ["text_encoder"], "pixart": ["text_encoder"], "video3d": ["text_encoder"]}
    text["sd3"] = ["text_encoder", "text_encoder_2"]
    for name in text[family]:
        assert (runs["foster"] / f"{name}.safetensors").is_file()
        changed = load_file(runs["foster"] / f"{name}.safetensors")
        assert any(v.abs().sum() > 0 for k, v in changed.items() if ".lora_B." in k)  # text experts trained


def test_loss_falls_when_overfitting(assets, tmp_path, capsys):
    """Held-out-free check: the denoising loss on fixed (image, noise, t) draws falls after training on them."""
    from tsm.config import load_config
    from tsm.recipes.base import encode_latents
    from tsm.recipes.run import build, load_run

    images = write_digits_image_folder(tmp_path / "two", n=2, size=16)
    cfg_path = write_config(
        tmp_path / "fit.yaml",
        "sd15",
        assets,
        data={"path": str(images)},
        optim={"lr": 1e-2},
        train={"steps": 40, "batch_size": 4, "checkpoint_every": 40, "method": "foster"},
        experts={
            "scales": [2, 1],
            "rank": 4,
            "alpha": 4,
            "targets": ATTN + ["conv1", "conv2", "proj_in", "proj_out"],
        },
    )
    code, err = run_cli("train", cfg_path, capsys=capsys)
    assert code == 0, err

    def fixed_loss(c) -> float:
        from tsm.data import CaptionedImageFolder, collate

        ds = CaptionedImageFolder(images, 16)
        batch = collate([ds[i] for i in (0, 1, 0, 1, 0, 1, 0, 1)])
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            x0 = encode_latents(c, batch, None, [g] * 8)
            t = torch.tensor([50, 150, 300, 450, 550, 700, 850, 950])
            noise = torch.randn(x0.shape, generator=g)
            for m in c.modules().values():
                m.eval()  # core experts, as when sampling
            tsm.set_timesteps(c.text_encoders["text_encoder"], t)
            cond = c.family.encode_prompt(c, batch["captions"])
            pred = c.family.denoise(c, c.objective.noisy(x0, noise, t), t, cond)
            return float(c.objective.loss(pred, x0, noise, t).mean())

    cfg = load_config(cfg_path)
    before = fixed_loss(build(cfg, torch.device("cpu"), torch.float32))  # zero-init experts == the base model
    after = fixed_loss(load_run(tmp_path / "fit")[1])
    assert after < 0.8 * before, (before, after)


# ---------------------------------------------------------------------------------------------------------
def test_sample_grid_matches_files_and_export_info(assets, tmp_path, capsys):
    from PIL import Image

    from tsm.images import grid_tile

    cfg = write_config(tmp_path / "foster.yaml", "sd15", assets, train={"method": "foster", "steps": 2})
    assert run_cli("train", cfg, capsys=capsys)[0] == 0
    cfg = write_config(
        tmp_path / "assemble.yaml",
        "sd15",
        assets,
        train={"method": "assemble", "steps": 2, "experts_from": str(tmp_path / "foster")},
    )
    assert run_cli("train", cfg, capsys=capsys)[0] == 0
    for run in ("foster", "assemble"):
        out = tmp_path / f"samples_{run}"
        code, err = run_cli(
            "sample", tmp_path / run, "--prompt", "a digit 1", "--prompt", "a digit 7", "--seeds", "0", "1", "2",
            "--steps", "3", "--out", out, capsys=capsys,
        )  # fmt: skip
        assert code == 0, err
        files = sorted(out.glob("p*_seed*.png"))
        assert len(files) == 6
        grid = Image.open(out / "grid.png")
        for k, name in enumerate(
            ["p00_seed0", "p00_seed1", "p00_seed2", "p01_seed0", "p01_seed1", "p01_seed2"]
        ):
            tile = Image.open(out / f"{name}.png")
            assert list(grid_tile(grid, k, 3, tile.size).getdata()) == list(tile.convert("RGB").getdata())
        a, b = (Image.open(out / f"p00_seed{s}.png") for s in (0, 1))
        assert list(a.getdata()) != list(b.getdata())  # seeds differ

    code, err = run_cli(
        "export",
        tmp_path / "foster",
        "--scale",
        "0",
        "--index",
        "2",
        "--out",
        tmp_path / "e.safetensors",
        capsys=capsys,
    )
    assert code == 0, err
    keys = load_file(tmp_path / "e.safetensors").keys()
    # without --module the file carries the run's whole expert: the UNet's and the text encoder's
    assert keys and all(
        k.startswith(("unet.", "text_encoder.")) and (".lora_A." in k or ".lora_B." in k) for k in keys
    )
    assert any(k.startswith("text_encoder.") for k in keys)
    code, err = run_cli("export", tmp_path / "foster", "--all", "--out", tmp_path / "all", capsys=capsys)
    assert code == 0 and len(list((tmp_path / "all").glob("*.safetensors"))) == 5
    # the same expert as kohya keys (the tensors renamed and the scale folded as kohya's alpha), and the
    # ComfyUI folder: one LoRA per finest interval + the workflow switching them
    code, err = run_cli(
        "export", tmp_path / "foster", "--scale", "0", "--index", "2", "--format", "kohya",
        "--out", tmp_path / "k.safetensors", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    kohya, diffusers_file = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "e.safetensors")
    assert (
        all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)
        and len(kohya) == len(diffusers_file) * 3 // 2
    )
    assert any(k.startswith("lora_te_") for k in kohya)
    downs = sorted(v.sum().item() for k, v in kohya.items() if k.endswith("lora_down.weight"))
    assert downs == sorted(v.sum().item() for k, v in diffusers_file.items() if ".lora_A." in k)
    code, err = run_cli(
        "export",
        tmp_path / "foster",
        "--comfyui",
        tmp_path / "comfy",
        "--ckpt",
        "sd15.safetensors",
        capsys=capsys,
    )
    assert code == 0, err
    graph = json.loads((tmp_path / "comfy" / "workflow_api.json").read_text())
    loras = sorted(p.name for p in (tmp_path / "comfy").glob("*.safetensors"))
    assert loras == [f"tsm_s0_i{i}.safetensors" for i in range(4)]
    assert sorted(n["inputs"]["lora_name"] for n in graph.values() if "lora_name" in n["inputs"]) == loras
    refused = one_line_error(
        capsys, "export", tmp_path / "assemble", "--comfyui", tmp_path / "c2", "--ckpt", "sd15.safetensors"
    )
    assert "depend on the layer's input" in refused  # the assembled run's router reads z: not a LoRA
    assert run_cli("info", tmp_path / "foster" / "unet.safetensors", capsys=None)[0] == 0
    printed = capsys.readouterr().out
    assert "scales" in printed and "foster" in printed


# ---------------------------------------------------------------------------------------------------------
def one_line_error(capsys, *argv) -> str:
    code, err = run_cli(*argv, capsys=capsys)
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err  # one line, last, after any progress bar
    return errors[0]


def test_bad_input_gives_one_line(assets, tmp_path, capsys):
    cfg = write_config(tmp_path / "typo.yaml", "sd15", assets, train={"stepz": 3})
    msg = one_line_error(capsys, "train", cfg)
    assert "train.stepz" in msg and "'train.steps'" in msg
    msg = one_line_error(capsys, "train", write_config(tmp_path / "ok.yaml", "sd15", assets), "optim.lrr=1")
    assert "optim.lrr" in msg and "optim.lr" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    msg = one_line_error(
        capsys, "train", write_config(tmp_path / "e.yaml", "sd15", assets, data={"path": str(empty)})
    )
    assert str(empty) in msg
    msg = one_line_error(
        capsys,
        "train",
        write_config(tmp_path / "m.yaml", "sd15", assets, data={"path": str(tmp_path / "nope")}),
    )
    assert "nope" in msg

    broken = tmp_path / "broken"
    write_digits_image_folder(broken, n=2, size=16)
    victim = sorted(broken.glob("*.png"))[0]
    victim.write_bytes(b"not a png")
    msg = one_line_error(
        capsys, "train", write_config(tmp_path / "b.yaml", "sd15", assets, data={"path": str(broken)})
    )
    assert victim.name in msg

    nocap = tmp_path / "nocap"
    write_digits_image_folder(nocap, n=2, size=16)
    orphan = sorted(nocap.glob("*.txt"))[0]
    orphan.unlink()
    msg = one_line_error(
        capsys, "train", write_config(tmp_path / "c.yaml", "sd15", assets, data={"path": str(nocap)})
    )
    assert orphan.stem in msg

    # a checkpoint of another model: assembling the PixArt model from SD1.5 experts
    sd = write_config(tmp_path / "sd.yaml", "sd15", assets, train={"steps": 1})
    assert run_cli("train", sd, capsys=capsys)[0] == 0
    other = write_config(
        tmp_path / "px.yaml",
        "pixart",
        assets,
        train={"method": "assemble", "experts_from": str(tmp_path / "sd")},
    )
    msg = one_line_error(capsys, "train", other)
    assert "safetensors" in msg


def test_nan_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path, capsys):
    cfg = write_config(
        tmp_path / "nan.yaml", "sd15", assets,
        optim={"lr": 1e30, "max_grad_norm": None}, train={"steps": 8, "checkpoint_every": 1},
    )  # fmt: skip
    msg = one_line_error(capsys, "train", cfg)
    assert "loss became" in msg and "at step" in msg
    step = int(msg.split("at step ")[1].split(";")[0])
    kept = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert kept[-1] == f"step_{step - 1:07d}" and step > 1
    assert not (tmp_path / "nan" / "unet.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
def test_resume_after_sigkill_gives_the_same_weights(assets, tmp_path):
    steps = {"steps": 10, "checkpoint_every": 2, "keep_last": 5, "validation_steps": 1}
    cfg = write_config(tmp_path / "killed.yaml", "sd15", assets, train=steps, experts={"dropout": 0.1})
    ref = write_config(tmp_path / "straight.yaml", "sd15", assets, train=steps, experts={"dropout": 0.1})
    cmd = [sys.executable, "-m", "tsm.cli", "train", str(cfg)]
    target = tmp_path / "killed" / "checkpoints" / "step_0000004" / "state.json"
    kill_when(cmd, target)
    assert target.exists() and not (tmp_path / "killed" / "unet.safetensors").exists()
    done = subprocess.run(
        [*cmd, "--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout + done.stderr
    assert main(["train", str(ref)]) == 0
    for name in ("unet", "text_encoder"):
        a, b = (
            load_file(tmp_path / "killed" / f"{name}.safetensors"),
            load_file(tmp_path / "straight" / f"{name}.safetensors"),
        )
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_two_processes_match_one(assets, tmp_path):
    steps = {"steps": 3, "batch_size": 4, "validation_steps": 1}
    two = write_config(tmp_path / "two.yaml", "sd15", assets, train=steps)
    one = write_config(tmp_path / "one.yaml", "sd15", assets, train=steps)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "tsm.cli",
        "train",
        str(two),
    ]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", str(one)]) == 0
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["max_rank_difference"] == 0.0  # identical on both ranks
    for name in ("unet", "text_encoder"):
        a, b = (
            load_file(tmp_path / "two" / f"{name}.safetensors"),
            load_file(tmp_path / "one" / f"{name}.safetensors"),
        )
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_is_a_one_line_error(assets, tmp_path, capsys):
    cfg = write_config(tmp_path / "w.yaml", "sd15", assets, train={"log_with": "wandb"})
    msg = one_line_error(capsys, "train", cfg)
    assert "pip install wandb" in msg
