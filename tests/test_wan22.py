"""Wan 2.2 A14B's two transformers through `tsm train`, `tsm sample` and `tsm export`, on a tiny random
two-transformer folder written by WanPipeline.save_pretrained: the joint run equals the two one-sided runs step
for step, --resume after SIGKILL is bit-identical, the exported pair loads in WanPipeline and draws tsm
sample's frames, and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import kill_when, subprocess_env, write_digit_clips, write_tiny_wan

from tsm.cli import main

RES, FRAMES = 32, 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wan22")
    return {
        "model": write_tiny_wan(root / "wan22", boundary_ratio=0.875),
        "clips": write_digit_clips(root / "clips", n=4, frames=FRAMES, size=RES),
    }


def train_args(assets: dict, run: Path, config: str = "wan22_foster", *more: str) -> list[str]:
    """A packaged Wan 2.2 config at tiny sizes: 5-frame 32x32 clips, rank 2, 4 steps of 4 clips in 2 micro-batches,
    float32 on the CPU, no validation grid; one latent and text cache for every run (the VAE and UMT5 encode each
    clip and caption once, so every run trains on the same latents to the last bit)."""
    return [
        "train", config, f"model.path={assets['model']}", f"data.path={assets['clips']}",
        f"data.resolution={RES}", f"data.num_frames={FRAMES}", "experts.rank=2", "experts.alpha=2",
        "experts.scales=[2,1]", "train.steps=4", "train.batch_size=4", "train.grad_accum=2",
        "train.mixed_precision='no'", "train.gradient_checkpointing=false", "train.checkpoint_every=2",
        "train.keep_last=5", "train.validation_prompts=[]", "train.log_with=none", f"train.output_dir={run}",
        f"data.cache_dir={assets['model'].parent / 'cache'}", *more,
    ]  # fmt: skip


def curves(run: Path) -> dict[str, dict[int, float]]:
    state = json.loads((run / "checkpoints" / "step_0000004" / "state.json").read_text())
    return {k: dict(tuple(p) for p in v) for k, v in state["curves"].items()}


@pytest.fixture(scope="module")
def joint(assets, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("joint") / "run"
    assert main(train_args(assets, run)) == 0
    return run


# ---------------------------------------------------------------------------------------------------------
def test_the_joint_run_equals_two_separate_runs(assets, joint, tmp_path):
    """Each transformer's experts after 4 steps, and each transformer's loss at every step, are what a run
    training that transformer alone on its own samples gives (train.only_transformer)."""
    joint_curves = curves(joint)
    assert {
        "loss/high_noise_interval_0",
        "loss/low_noise_interval_1",
        "loss/high_noise",
        "loss/low_noise",
    } <= set(joint_curves)
    for side, name in (("high", "transformer"), ("low", "transformer_2")):
        run = tmp_path / side
        assert main(train_args(assets, run, "wan22_foster", f"train.only_transformer={side}")) == 0
        other = "transformer_2" if name == "transformer" else "transformer"
        assert (run / f"{name}.safetensors").exists() and not (run / f"{other}.safetensors").exists()
        a, b = load_file(joint / f"{name}.safetensors"), load_file(run / f"{name}.safetensors")
        assert a.keys() == b.keys() and len(a) > 0
        trained = [k for k in a if ".lora_B." in k and a[k].abs().sum() > 0]
        assert trained  # the experts moved off zero
        for k in a:  # bit for bit: each transformer runs on exactly the rows the one-sided run gives it
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
        alone = curves(run)
        for key, points in joint_curves.items():
            if key.startswith(f"loss/{side}_noise"):
                assert points.keys() == alone[key].keys()
                for step, value in points.items():
                    assert value == pytest.approx(alone[key][step], abs=1e-5), (key, step)
    # every step saw both sides at least once over the run, and each side's loss is its own mean
    assert joint_curves["loss/high_noise"] and joint_curves["loss/low_noise"]


def test_resume_after_sigkill_is_bit_identical(assets, joint, tmp_path):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tsm.cli", *train_args(assets, run)]
    target = run / "checkpoints" / "step_0000002" / "state.json"
    kill_when(cmd, target)
    assert target.exists() and not (run / "transformer.safetensors").exists()
    done = subprocess.run(
        [*cmd, "--resume"], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout + done.stderr
    for name in ("transformer", "transformer_2"):
        a, b = load_file(run / f"{name}.safetensors"), load_file(joint / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert curves(run) == curves(joint)


# ---------------------------------------------------------------------------------------------------------
# export and sample
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(assets, tmp_path_factory) -> Path:
    """wan22_pair (one LoRA per transformer), 2 steps at a large lr so that the LoRAs change the frames."""
    run = tmp_path_factory.mktemp("pair") / "mypair"
    args = train_args(assets, run, "wan22_pair", "experts.scales=[1]", "optim.lr=3e-2", "train.steps=2")
    assert main(args) == 0
    return run


def pipeline_frames(
    assets: dict, files: dict[str, Path] | None, guidance: float, guidance_2: float
) -> torch.Tensor:
    """WanPipeline from the folder with the LoRA pair loaded as its docs say: (1, 3, F, H, W) in [-1, 1]."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(assets["model"])
    if files is not None:
        pipe.load_lora_weights(files["high"])
        pipe.load_lora_weights(files["low"], load_into_transformer_2=True)
    out = pipe(
        "a moving digit", height=RES, width=RES, num_frames=FRAMES, num_inference_steps=6, guidance_scale=guidance,
        guidance_scale_2=guidance_2, generator=[torch.Generator().manual_seed(0)], output_type="pt",
    ).frames  # fmt: skip  # (1, F, 3, H, W) in [0, 1]
    return out.permute(0, 2, 1, 3, 4) * 2 - 1


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_the_exported_pair_loads_in_wanpipeline_and_draws_tsm_samples_frames(
    assets, pair, tmp_path, fmt, capsys
):
    from tsm.recipes.run import load_run
    from tsm.sampling import sample

    out = tmp_path / "loras"
    assert main(["export", str(pair), "--out", str(out), "--format", fmt]) == 0
    files = {"high": out / "mypair_high_noise.safetensors", "low": out / "mypair_low_noise.safetensors"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())
    keys = list(load_file(files["high"]))
    head = "transformer.blocks." if fmt == "diffusers" else "diffusion_model.blocks."
    assert all(k.startswith(head) for k in keys), keys[:2]
    if fmt == "comfyui":  # Wan's own module names, as ComfyUI's Wan model names its weights
        assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys
        assert "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in keys
    _, c = load_run(pair)
    ours = sample(c, ["a moving digit"], [0], 6, 5.0, resolution=RES, num_frames=FRAMES, progress=False,
                  guidance_scale_2=3.0)  # fmt: skip
    theirs = pipeline_frames(assets, files, 5.0, 3.0)
    assert ours.shape == theirs.shape == (1, 3, FRAMES, RES, RES)
    assert (ours - theirs).abs().max() < 1e-4
    base = pipeline_frames(assets, None, 5.0, 3.0)
    assert (base - ours).abs().max() > 1e-2  # the pair matters: far beyond the tolerance


def test_interval_experts_export_per_interval_and_transformer(joint, tmp_path):
    out = tmp_path / "loras"
    assert main(["export", str(joint), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"run_s0_i{i}_{side}_noise.safetensors" for side in ("high", "low") for i in (0, 1)
    )
    assert main(["export", str(joint), "--all", "--out", str(tmp_path / "all")]) == 0
    assert len(list((tmp_path / "all").iterdir())) == 2 * 3  # scales (2, 1): 3 experts per transformer


def test_comfyui_workflow_switches_models_at_the_boundary_and_experts_by_step(joint, tmp_path, capsys):
    """The two-sampler workflow: ComfyUI's schedule for its steps, the high-noise model until t < 875, each
    sampler's hook keyframes walked with ComfyUI's rule (restated in test_comfyui) run tsm's expert per call."""
    from test_comfyui import Flow, hooks_of, run_keyframes, simple_scheduler

    from tsm import comfyui
    from tsm.intervals import expert_index
    from tsm.models.wan import two_stage_specs
    from tsm.spec import ExpertSpec

    out = tmp_path / "comfy"
    assert main(["export", str(joint), "--comfyui", str(out), "--steps", "10"]) == 0
    graph = json.loads((out / "workflow_api.json").read_text())
    comfyui.check_graph(graph)
    samplers = [n["inputs"] for n in graph.values() if n["class_type"] == "KSamplerAdvanced"]
    loaders = [n["inputs"]["unet_name"] for n in graph.values() if n["class_type"] == "UNETLoader"]
    assert loaders == [comfyui.WAN22_FILES["high"], comfyui.WAN22_FILES["low"]]
    shift = 3.0  # the tiny folder's flow_shift, pinned with ModelSamplingSD3
    sigmas = simple_scheduler(Flow(shift), 10)
    t = [float(s) * 1000 for s in sigmas[:-1]]
    switch = next(k for k, tk in enumerate(t) if tk < 875)
    assert 0 < switch < 10 and all(tk >= 875 for tk in t[:switch])
    assert [(s["start_at_step"], s["end_at_step"]) for s in samplers] == [(0, switch), (switch, 10000)]
    assert [s["add_noise"] for s in samplers] == ["enable", "disable"]
    assert samplers[1]["latent_image"][0] in graph and graph[samplers[1]["latent_image"][0]][
        "class_type"
    ] == ("KSamplerAdvanced")
    specs = two_stage_specs(ExpertSpec(scales=(2, 1)), 875.0)
    hooks = hooks_of(graph)
    for side, part, (lo, hi) in (
        ("high", "transformer", (0, switch)),
        ("low", "transformer_2", (switch, 10)),
    ):
        mine = {k: v for k, v in hooks.items() if k.endswith(f"_{side}_noise.safetensors")}
        scale = specs[part].scales[0]
        expected = [
            [f"run_s0_i{i}_{side}_noise.safetensors"] for i in expert_index(torch.tensor(t[lo:hi]), scale)
        ]
        assert run_keyframes(mine, Flow(shift), sigmas[lo : hi + 1]) == expected


# ---------------------------------------------------------------------------------------------------------
# bring what users have
# ---------------------------------------------------------------------------------------------------------
def test_an_ai_toolkit_pair_warm_starts_both_transformers(assets, pair, tmp_path):
    """ai-toolkit's two files (<name>_high_noise / _low_noise, Wan's original diffusion_model. keys, what
    `--format comfyui` writes) as train.experts_from: every expert of each transformer starts as its file."""
    from tsm.config import load_config
    from tsm.recipes.lora_foster import import_warm_start
    from tsm.recipes.run import build

    loras = tmp_path / "aitk"
    assert main(["export", str(pair), "--out", str(loras), "--format", "comfyui", "--name", "style"]) == 0
    cfg = load_config(
        train_args(assets, tmp_path / "warm", "wan22_foster")[1], train_args(assets, tmp_path)[2:]
    )
    c = build(cfg, torch.device("cpu"), torch.float32)
    lines = import_warm_start(c, loras)
    assert [line.split(" ")[0] for line in lines] == ["transformer", "transformer_2"]
    for name in ("transformer", "transformer_2"):
        want = load_file(pair / f"{name}.safetensors")  # the pair's one expert s0_i0 per layer
        got = dict(c.modules()[name].named_parameters())
        for key in (k for k in got if ".lora_" in k):
            module, _, expert = key.rpartition(".")
            torch.testing.assert_close(got[key], want[f"{module}.s0_i0"], atol=1e-6, rtol=0)
    with pytest.raises(Exception, match="found 0"):
        import_warm_start(c, tmp_path)


def test_a_file_for_the_other_transformer_is_refused_in_one_line(pair, tmp_path):
    import tsm
    from tsm.recipes.run import load_run

    out = tmp_path / "loras"
    assert main(["export", str(pair), "--out", str(out)]) == 0
    _, c = load_run(pair)
    low = c.modules()["transformer_2"]
    with pytest.raises(tsm.TsmError, match="holds the experts of transformer, not transformer_2"):
        tsm.import_lora(low, out / "mypair_high_noise.safetensors", component="transformer_2")
    with pytest.raises(tsm.TsmError, match="holds the experts of transformer, not transformer_2"):
        tsm.io.load(low, pair / "transformer.safetensors", component="transformer_2")


# ---------------------------------------------------------------------------------------------------------
# bad input: one line, nothing lost
# ---------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line(assets, tmp_path, capsys):
    from tsm.models import get_family

    # a two-transformer folder without boundary_ratio
    folder = tmp_path / "noboundary"
    folder.mkdir()
    for sub in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).symlink_to(assets["model"] / sub)
    index = json.loads((assets["model"] / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps({k: v for k, v in index.items() if k != "boundary_ratio"})
    )
    args = train_args(assets, tmp_path / "a", "wan22_pair", f"model.path={folder}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has a transformer_2 but no boundary_ratio" in err and len(err.strip().splitlines()) == 1
    # image-to-video folders: refused naming what is missing
    index = {**index, "_class_name": "WanImageToVideoPipeline"}
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(train_args(assets, tmp_path / "i2v", "wan22_pair", f"model.path={folder}")) == 2
    err = capsys.readouterr().err
    assert "WanImageToVideoPipeline" in err and "first frame's VAE latents" in err
    # a boundary no sample reaches: which side got none, before any step
    run = tmp_path / "b"
    args = train_args(
        assets, run, "wan22_pair", "train.steps=1", "train.batch_size=1", "train.grad_accum=1", "train.seed=2"
    )
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "falls at t >= 875, so the high-noise transformer (transformer) would train nothing" in err
    assert "train.high_noise_fraction" in err and not (run / "checkpoints").exists()
    # the fix it names works: a share of every step at t >= 875
    assert main([*args, "train.high_noise_fraction=0.5", "train.batch_size=2"]) == 0

    # a clip length that is not 4k + 1: the rule and the nearest valid counts
    class VAE:
        config = type("C", (), {"scale_factor_temporal": 4})

    with pytest.raises(Exception, match=r"num_frames = 4k \+ 1 .* got 7; set data.num_frames=5 or 9"):
        get_family("wan").frames_of(type("C", (), {"vae": VAE})(), 7)
    # options that need two transformers, or one
    assert main([*train_args(assets, tmp_path / "c", "wan22_pair"), "train.batch_per_expert=true"]) == 2
    assert "not available with Wan 2.2's two transformers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# memory options
# ---------------------------------------------------------------------------------------------------------
def test_float8_storage_stays_within_tolerance_of_bf16(assets, tmp_path):
    """model.storage_dtype=float8_e4m3fn: the transformers' linear weights stored in float8 (experts float32),
    each layer computing in bf16; the velocity of both transformers within 3% (relative L2) of the bf16 model."""
    from tsm.config import load_config
    from tsm.recipes.run import build

    outs = {}
    for storage in ("null", "float8_e4m3fn"):
        cfg = load_config("wan22_pair", [*train_args(assets, tmp_path)[2:], "train.mixed_precision=bf16",
                                         f"model.storage_dtype={storage}"])  # fmt: skip
        c = build(cfg, torch.device("cpu"), torch.bfloat16)
        q = c.modules()["transformer_2"].blocks[0].attn1.to_q
        assert q.base_layer.weight.dtype == (torch.bfloat16 if storage == "null" else torch.float8_e4m3fn)
        assert q.lora_A["s0_i0"].dtype == torch.float32 and c.dtype == torch.bfloat16
        x = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
        cond = {k: v.expand(2, -1, -1) for k, v in c.family.encode_prompt(c, ["a digit"]).items()}
        with torch.no_grad():
            outs[storage] = c.family.denoise(c, x, torch.tensor([950.0, 300.0]), cond).float()
    ref, got = outs["null"], outs["float8_e4m3fn"]
    error = float((got - ref).norm() / ref.norm())
    assert 0 < error < 0.03, error


def test_offloading_the_inactive_transformer_trains_the_same(assets, joint, tmp_path):
    run = tmp_path / "offload"
    assert main(train_args(assets, run, "wan22_foster", "train.offload_inactive=true")) == 0
    for name in ("transformer", "transformer_2"):
        a, b = load_file(run / f"{name}.safetensors"), load_file(joint / f"{name}.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
