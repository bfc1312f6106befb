"""`tsm train` with method distill and glance on tiny models: files, stages, resume, sampling, per-step export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import write_tiny_model

import tsm
from tsm.cli import main
from tsm.data import write_digits_image_folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fewstep")
    out = {f: write_tiny_model(f, root / f) for f in ("sd15", "sd3")}
    out["images"] = write_digits_image_folder(root / "images", n=4, size=16)
    return out


def write_config(path: Path, family: str, assets: dict, **sections) -> Path:
    cfg = {
        "model": {"family": family, "path": str(assets[family])},
        "experts": {"scales": [4, 1], "rank": 2, "alpha": 2, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "data": {"path": str(assets["images"]), "resolution": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {
            "steps": 2,
            "assemble_steps": 2,
            "batch_size": 2,
            "checkpoint_every": 2,
            "keep_last": 3,
            "output_dir": str(path.parent / path.stem),
            "validation_prompts": ["a digit 3"],
            "validation_seeds": [0, 1],
        },
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def check_run(run: Path, den: str, stage: str, total: int) -> None:
    assert (run / f"{den}.safetensors").is_file() and (run / "loss.png").is_file()
    assert (run / "samples" / "final.png").is_file()
    assert tsm.io.read_metadata(run / f"{den}.safetensors")["tsm_stage"] == stage
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == total and summary["final_loss"] == summary["final_loss"]  # not NaN
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == [f"step_{s:07d}" for s in range(2, total + 1, 2)]


def resume_matches(run: Path, cfg: Path, den: str, capsys, files: tuple[str, ...]) -> None:
    """Drop everything after the first checkpoint, resume, and get the same weights bit for bit."""
    want = {f: load_file(run / "checkpoints" / "step_0000004" / f) for f in files}
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / f"{den}.safetensors").unlink()
    code, err = run_cli(capsys, "train", cfg, "--resume")
    assert code == 0, err
    for f in files:
        got = load_file(run / "checkpoints" / "step_0000004" / f)
        assert got.keys() == want[f].keys()
        assert all(torch.equal(got[k], want[f][k]) for k in got), f


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_distill_two_stages_with_gan_phase_writes_files_and_resumes(family, assets, tmp_path, capsys):
    den = "unet" if family == "sd15" else "transformer"
    timesteps = [999, 749, 499, 249]
    cfg = write_config(
        tmp_path / "distill.yaml",
        family,
        assets,
        train={"method": "distill"},
        distill={
            "timesteps": timesteps,
            "fake_rank": 2,
            "fake_updates": 2,
            "gan_weight": 0.1,
            "gan_start": 1,
        },
    )
    code, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    run = tmp_path / "distill"
    check_run(run, den, "assemble", 4)
    ckpt = run / "checkpoints" / "step_0000002"
    assert (ckpt / "fake_score.safetensors").is_file() and (ckpt / "recipe.pt").is_file()
    state = torch.load(ckpt / "recipe.pt", weights_only=True)
    assert set(state) == {"opt", "fake_opt", "head"}
    # stage 1 fostered the experts, stage 2 left them alone and trained only the routers
    first = load_file(ckpt / f"{den}.safetensors")
    last = load_file(run / f"{den}.safetensors")
    experts = [k for k in first if ".lora_" in k]
    routers = [k for k in first if ".router." in k]
    assert experts and routers
    assert all(torch.equal(first[k], last[k]) for k in experts)
    assert any(not torch.equal(first[k], last[k]) for k in routers)
    assert any(first[k].abs().sum() > 0 for k in experts if ".lora_B." in k)
    resume_matches(run, cfg, den, capsys, (f"{den}.safetensors", "fake_score.safetensors"))

    # per-step LoRA files: the fostered checkpoint's core experts; the assembled model's router reads features
    code, err = run_cli(capsys, "export", ckpt, "--timesteps", *timesteps, "--out", tmp_path / "steps")
    assert code == 0, err
    for t, i in zip(timesteps, (3, 2, 1, 0), strict=True):
        meta = tsm.io.read_metadata(tmp_path / "steps" / f"t{t}.safetensors")
        assert json.loads(meta["tsm_expert"])["index"] == i
    code, err = run_cli(capsys, "export", run, "--timesteps", "999", "--out", tmp_path / "steps2")
    assert code == 2 and "not a LoRA" in err

    # `tsm sample` takes the generator's 4 steps
    code, err = run_cli(
        capsys, "sample", run, "--prompt", "a digit 1", "--seeds", "0", "1", "--out", tmp_path / "s"
    )
    assert code == 0, err
    assert len(list((tmp_path / "s").glob("p00_seed*.png"))) == 2


def test_glance_with_router_writes_files_resumes_and_samples(assets, tmp_path, capsys):
    cfg = write_config(
        tmp_path / "glance.yaml",
        "sd3",
        assets,
        train={"method": "glance", "batch_size": 1},
        glance={"router": True, "max_pairs": 2},
    )
    code, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    run = tmp_path / "glance"
    check_run(run, "transformer", "assemble", 4)
    spec = tsm.read_spec(run / "transformer.safetensors")
    assert len(spec.scales) == 2 and spec.experts_per_scale == (2, 1)  # slow/fast cut + the full-range LoRA
    resume_matches(run, cfg, "transformer", capsys, ("transformer.safetensors",))
    code, err = run_cli(capsys, "sample", run, "--seeds", "3", "--guidance", "2", "--out", tmp_path / "s")
    assert code == 0, err


def test_fewstep_config_errors_are_one_line(assets, tmp_path, capsys):
    cases = [
        ({"train": {"method": "distill"}, "distill": {"timesteps": [249, 999]}}, "distill.timesteps"),
        ({"train": {"method": "glance", "assemble_steps": 2}, "glance": {"router": False}}, "glance.router"),
        ({"train": {"method": "distill", "assemble_steps": 2}, "experts": {"scales": [4]}}, "context expert"),
        (
            {
                "train": {"method": "glance"},
                "glance": {"router": True},
                "experts": {"text_targets": ["q_proj"]},
            },
            "text_targets",
        ),
    ]
    for k, (sections, needle) in enumerate(cases):
        cfg = write_config(tmp_path / f"bad{k}.yaml", "sd15", assets, **sections)
        code, err = run_cli(capsys, "train", cfg)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------------------
def _assembled_t_only(tmp_path: Path, assets: dict):
    from tsm.models import get_family

    c = get_family("sd15").load(str(assets["sd15"]))
    torch.manual_seed(0)
    spec = tsm.ExpertSpec(
        scales=(4, 1), rank=2, targets=["to_q", "to_k", "to_v", "to_out.0"], router="t_only"
    )
    tsm.add_experts(c.denoiser, spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct experts and gates, so that a wrong expert or a wrong gate shows
        for _, layer in tsm.expert_layers(c.denoiser):
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            layer.router.table.copy_(torch.randn(layer.router.table.shape, generator=g))
    tsm.set_stage(c.denoiser, "assemble")
    return c


def test_per_step_export_is_the_models_update_at_that_step(assets, tmp_path):
    from diffusers import UNet2DConditionModel

    c = _assembled_t_only(tmp_path, assets)
    x = torch.randn(1, *c.family.latent_shape(c, 32, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = c.family.encode_prompt(c, ["a digit 3"])["encoder_hidden_states"]
    c.denoiser.eval()
    for t in (999, 300):
        path = tsm.io.export_step_lora(c.denoiser, t, tmp_path / f"t{t}.safetensors")
        fresh = UNet2DConditionModel.from_pretrained(assets["sd15"], subfolder="unet")
        fresh.load_lora_adapter(str(path), prefix="unet", adapter_name="step")
        fresh.eval()
        with torch.no_grad():
            want = c.denoiser(x, torch.tensor([t]), encoder_hidden_states=emb).sample
            got = fresh(x, torch.tensor([t]), encoder_hidden_states=emb).sample
            fresh.disable_adapters()
            base = fresh(x, torch.tensor([t]), encoder_hidden_states=emb).sample
        assert (want - base).abs().max() > 1e-3  # the experts do something at this step
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a router that reads the features is not a LoRA: a clear error
    tsm.inject.get_routing(c.denoiser).spec.router = "asymmetric"
    with pytest.raises(tsm.TsmError, match="not a LoRA"):
        tsm.io.export_step_lora(c.denoiser, 999, tmp_path / "x.safetensors")


def test_shipped_configs_parse_and_the_sd15_distill_config_runs(assets, tmp_path, capsys):
    from tsm.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "tsm" / "configs").glob("*.yaml"))
    assert {"sd15_distill.yaml", "flux_glance.yaml", "qwen_glance.yaml"} <= {p.name for p in configs}
    for path in configs:
        assert path.read_text().startswith(f"# tsm train {path.stem} "), path
        load_config(path)
    # the paper's distillation modules all exist in a diffusers UNet (the tiny one has every kind)
    code, err = run_cli(
        capsys, "train", configs[[p.name for p in configs].index("sd15_distill.yaml")],
        f"model.path={assets['sd15']}", f"data.path={assets['images']}", "data.resolution=16",
        "experts.rank=2", "distill.fake_rank=2", "distill.fake_updates=1", "train.steps=1",
        "train.assemble_steps=1", "train.batch_size=2", f"train.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert code == 0, err
    names = {
        k.split(".lora_")[0] for k in load_file(tmp_path / "run" / "unet.safetensors") if ".lora_A." in k
    }
    for kind in ("to_q", "proj_in", "ff.net.2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"):
        assert any(n.endswith(kind) for n in names), kind
    assert any(n.endswith("time_emb_proj") for n in names)


@pytest.mark.parametrize("name", ["digits_distill", "digits_glance"])
def test_digits_configs_run_on_the_builtin_model(name, tmp_path, capsys):
    from tsm.bench.digits_data import write_folder

    data = write_folder(tmp_path / "data", n=8)
    assert sorted(p.read_text().split()[0] for p in data.glob("*.txt")) == ["digit"] * 8
    config = name  # a packaged config, by name
    code, err = run_cli(
        capsys, "train", config, f"data.path={data}", "train.steps=2", "train.assemble_steps=1",
        "train.batch_size=2", f"train.output_dir={tmp_path / 'run'}", "distill.fake_updates=1",
    )  # fmt: skip
    assert code == 0, err
    assert tsm.io.read_metadata(tmp_path / "run" / "unet.safetensors")["tsm_stage"] == "assemble"
    assert (tmp_path / "run" / "samples" / "final.png").is_file()


@pytest.mark.parametrize("method", ["distill", "glance"])
def test_bf16_runs_keep_float32_adapters_and_fp16_is_refused(method, assets, tmp_path, capsys):
    extra = (
        {"glance": {"router": True}}
        if method == "glance"
        else {"distill": {"fake_rank": 2, "fake_updates": 1}}
    )
    train = {"method": method, "steps": 1, "assemble_steps": 1, "mixed_precision": "bf16"}
    cfg = write_config(tmp_path / "bf16.yaml", "sd15", assets, train=train, **extra)
    code, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    weights = load_file(tmp_path / "bf16" / "unet.safetensors")
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    code, err = run_cli(capsys, "train", cfg, "train.mixed_precision=fp16")
    assert code == 2 and "bf16" in err


@pytest.mark.parametrize(("family", "resolution"), [("flux", 16), ("qwen", 32)])
def test_glance_and_distill_run_on_tiny_flux_and_qwen(family, resolution, assets, tmp_path, capsys):
    model = write_tiny_model(family, tmp_path / family)
    for method, extra in (
        ("glance", {"glance": {"router": True}}),
        ("distill", {"distill": {"fake_rank": 2, "fake_updates": 1}, "experts": {"scales": [4, 1]}}),
    ):
        cfg = write_config(
            tmp_path / f"{method}.yaml",
            family,
            {**assets, family: model},
            train={"method": method, "steps": 1, "assemble_steps": 1, "batch_size": 1},
            data={"path": str(assets["images"]), "resolution": resolution},
            **extra,
        )
        code, err = run_cli(capsys, "train", cfg)
        assert code == 0, err
        spec = tsm.read_spec(tmp_path / method / "transformer.safetensors")
        assert spec.timestep_scale == 1000.0 and len(spec.scales) == 2
        assert (tmp_path / method / "samples" / "final.png").is_file()
