"""The wan family on tiny random WanPipeline folders loaded with from_pretrained: loading, the prompt, latents
and decoding against WanPipeline's own code, tsm's sampler against WanPipeline sample for sample with experts
routed, Wan 2.2's two transformers (tests/test_wan22.py trains them), and `tsm train` end to end on a clip folder."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_experts
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from safetensors.torch import load_file, save_file
from tiny_models import write_digit_clips, write_tiny_wan

import tsm
from tsm.cli import main
from tsm.intervals import expert_index
from tsm.models import get_family
from tsm.models.wan import two_stage_specs
from tsm.sampling import sample

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPTS, SEEDS = ["a red digit", "digit 3 moving left"], [0, 1]
STEPS, GUIDANCE, RES, FRAMES = 6, 5.0, 32, 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wan")
    return {
        "2.1": write_tiny_wan(root / "wan21"),
        "2.2": write_tiny_wan(root / "wan22", boundary_ratio=0.875),
    }


def pipeline(path, c) -> WanPipeline:
    """WanPipeline from the folder with tsm's transformer(s) and text encoder, so its unmodified loop routes
    their experts (the VAE, tokenizer and scheduler are the pipeline's own)."""
    extra = {"transformer_2": c.extra["transformer_2"]} if "transformer_2" in c.extra else {}
    text = c.text_encoders["text_encoder"]
    return WanPipeline.from_pretrained(path, transformer=c.denoiser, text_encoder=text, **extra)


def call_pipeline(pipe: WanPipeline, res: int = RES) -> torch.Tensor:
    """Clips (N, 3, F, H, W) in [-1, 1], the noise of sample k drawn from its own seed as tsm draws it."""
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    out = pipe(
        PROMPTS, height=res, width=res, num_frames=FRAMES, num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, generator=gens, output_type="pt",
    ).frames  # fmt: skip  # (N, F, 3, H, W) in [0, 1]
    return out.permute(0, 2, 1, 3, 4) * 2 - 1


def record_routes(model: torch.nn.Module, log: list) -> None:
    """After every forward: (timestep, the core expert every sample was routed to)."""

    def hook(module, args, kwargs, output):
        ids = tsm.get_routing(module).state.main.ids
        log.append((float(kwargs["timestep"].flatten()[0]), sorted(set(ids.tolist()))))

    model.register_forward_hook(hook, with_kwargs=True)


def randomize_routers(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def wan_timesteps(steps: int, shift: float = 3.0, T: int = 1000) -> list[int]:
    """UniPC's flow timesteps written out: sigma = shift s / (1 + (shift - 1) s) on s = linspace(1, 1/T)."""
    s = np.linspace(1, 1 / T, steps + 1)[:-1]
    sigma = shift * s / (1 + (shift - 1) * s)
    sigma[0] -= 1e-6
    return [int(v) for v in sigma * T]  # int64 cast: truncation


# ---------------------------------------------------------------------------------------------------------
def test_loads_and_matches_the_pipelines_pieces(folders):
    f = get_family("wan")
    c = f.load(str(folders["2.1"]))
    assert type(c.denoiser).__name__ == "WanTransformer3DModel" and type(c.vae).__name__ == "AutoencoderKLWan"
    assert type(c.text_encoders["text_encoder"]).__name__ == "UMT5EncoderModel"
    assert type(c.scheduler).__name__ == "UniPCMultistepScheduler" and "transformer_2" not in c.extra
    # training table: FlowMatchEulerDiscreteScheduler with the sampler's flow_shift (3)
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps
    torch.testing.assert_close(c.objective.timesteps, table.float())
    assert c.objective.shift == 3.0
    assert f.load(str(folders["2.1"]), objective={"shift": 5.0}).objective.shift == 5.0
    pipe = pipeline(folders["2.1"], c)
    # the prompt: WanPipeline's embeddings (512 tokens, zero past each prompt)
    ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)
    got = f.encode_prompt(c, PROMPTS)["encoder_hidden_states"]
    assert got.shape == (2, 512, 32) and torch.equal(got, ref)
    assert got[0, 20:].abs().sum() == 0 and got[0, :3].abs().sum() > 0
    # latents of whole clips: (B, z, 1 + (F - 1) / 4, H / 8, W / 8); the pipeline's normalisation both ways
    assert f.latent_shape(c, RES, FRAMES) == (4, 2, 4, 4) and f.latent_shape(c, RES, 1)[1] == 1
    clip = torch.rand(1, 3, FRAMES, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = f.latent_dist(c, clip)
    torch.testing.assert_close(mean, c.vae.encode(clip).latent_dist.mean)
    assert mean.shape == (1, 4, 2, 4, 4) and std.shape == mean.shape
    z = f.scale_latents(c, mean)
    vae_mean = torch.tensor(c.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z[0, 2], (mean[0, 2] - 0.3) / 1.2)
    pipe_latents = pipe.vae.decode(
        z / (1.0 / torch.tensor(c.vae.config.latents_std).view(1, 4, 1, 1, 1)) + vae_mean
    )
    torch.testing.assert_close(f.decode(c, z), pipe_latents.sample)
    assert f.decode(c, z).shape == (1, 3, FRAMES, RES, RES)
    # a clip of 4 frames is not 4k + 1: one line naming the key
    for bad in (lambda: f.latent_shape(c, RES, 4), lambda: f.latent_dist(c, clip[:, :, :4])):
        with pytest.raises(tsm.TsmError, match="num_frames = 4k \\+ 1"):
            bad()
    with pytest.raises(tsm.TsmError, match="divisible by 16"):
        f.latent_shape(c, 24, FRAMES)


def test_defaults_are_wanpipelines():
    params = inspect.signature(WanPipeline.__call__).parameters
    f = get_family("wan")
    assert (f.default_steps, f.default_guidance) == (
        params["num_inference_steps"].default,
        params["guidance_scale"].default,
    )
    assert f.max_text_length == params["max_sequence_length"].default == 512


@pytest.mark.parametrize("stage", ["foster", "assemble"])
def test_sampler_matches_wanpipeline_with_experts(folders, stage):
    f = get_family("wan")
    c = f.load(str(folders["2.1"]))
    spec = tsm.ExpertSpec(scales=(4, 1), rank=2, targets=ATTN)
    tsm.add_experts(c.denoiser, spec, stage=stage)
    randomize_experts(c.denoiser, std=0.3)
    randomize_routers(c.denoiser)
    routes: list = []
    record_routes(c.denoiser, routes)
    ours = sample(c, PROMPTS, SEEDS, STEPS, GUIDANCE, resolution=RES, num_frames=FRAMES, progress=False)
    ours_routes, routes[:] = list(routes), []
    theirs = call_pipeline(pipeline(folders["2.1"], c))
    assert ours.shape == theirs.shape == (2, 3, FRAMES, RES, RES)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    # the expert of every pipeline call is floor(t * 4 / 1000) of UniPC's shifted timesteps
    ts = wan_timesteps(STEPS)
    assert [t for t, _ in routes] == [t for t in ts for _ in (0, 1)]  # cond, then uncond
    assert [e for _, e in routes] == [[int(expert_index(torch.tensor(t), 4))] for t in ts for _ in (0, 1)]
    assert {e[0] for _, e in routes} == {1, 2, 3}  # ts = 999, 937, 857, 750, 600, 376: three intervals
    assert [t for t, _ in ours_routes] == ts  # tsm: one [uncond; cond] batch per step, the same experts
    # the experts matter: without them the clips differ far beyond the tolerance
    with tsm.experts_off(c.denoiser):
        base = sample(c, PROMPTS, SEEDS, STEPS, GUIDANCE, resolution=RES, num_frames=FRAMES, progress=False)
    assert (base - ours).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Wan 2.2: two transformers, switched at boundary_ratio * T
# ---------------------------------------------------------------------------------------------------------
def test_two_stage_specs_cover_each_transformers_range():
    specs = two_stage_specs(tsm.ExpertSpec(scales=(4, 1), rank=2, targets=ATTN), 875.0)
    assert specs["transformer"].scales == ((906.25, 937.5, 968.75), 1)
    assert specs["transformer_2"].scales == ((218.75, 437.5, 656.25), 1)
    with pytest.raises(tsm.TsmError, match="boundary"):
        two_stage_specs(tsm.ExpertSpec(scales=(4, 1)), 1000.0)


def test_two_transformer_sampler_matches_wanpipeline(folders):
    f = get_family("wan")
    c = f.load(str(folders["2.2"]))
    high, low = c.denoiser, c.extra["transformer_2"]
    assert c.extra["boundary_timestep"] == 875.0
    assert not torch.equal(high.proj_out.weight, low.proj_out.weight)  # two different transformers
    specs = two_stage_specs(tsm.ExpertSpec(scales=(4, 1), rank=2, targets=ATTN), 875.0)
    routes = {"transformer": [], "transformer_2": []}
    for name, model in (("transformer", high), ("transformer_2", low)):
        tsm.add_experts(model, specs[name])
        randomize_experts(model, std=0.3, seed=7 if name == "transformer" else 8)
        record_routes(model, routes[name])
    ours = sample(c, PROMPTS, SEEDS, STEPS, GUIDANCE, resolution=RES, num_frames=FRAMES, progress=False)
    for log in routes.values():
        log.clear()
    theirs = call_pipeline(pipeline(folders["2.2"], c))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    # WanPipeline: transformer for t >= 875, transformer_2 below; each expert over its own range
    ts = wan_timesteps(STEPS)
    want_high = [(t, [min(int((t - 875) * 4 // 125), 3)]) for t in ts if t >= 875 for _ in (0, 1)]
    want_low = [(t, [int(t * 4 // 875)]) for t in ts if t < 875 for _ in (0, 1)]
    assert routes["transformer"] == want_high and routes["transformer_2"] == want_low
    assert len(want_high) == 4 and len(want_low) == 8  # ts = 999, 937 | 857, 750, 600, 376


def test_two_transformer_training_batch_goes_to_each_by_t(folders):
    """A mixed batch: each sample through the transformer of its t, gradients only on that one's experts."""
    f = get_family("wan")
    c = f.load(str(folders["2.2"]))
    high, low = c.denoiser, c.extra["transformer_2"]
    specs = two_stage_specs(tsm.ExpertSpec(scales=(2,), rank=2, targets=ATTN), 875.0)
    for name, model in (("transformer", high), ("transformer_2", low)):
        tsm.add_experts(model, specs[name])
        randomize_experts(model, std=0.3)
        model.train()
    x = torch.randn(3, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([880.0, 100.0, 990.0])  # 880: just above the boundary
    cond = {k: v.expand(3, -1, -1) for k, v in f.encode_prompt(c, ["a"]).items()}
    out = f.denoise(c, x, t, cond)
    with torch.no_grad():
        one = {k: v[:1] for k, v in cond.items()}  # the same prompt for every sample
        alone = [
            f._call(c, high if ti >= 875 else low, x[i : i + 1], t[i : i + 1], one) for i, ti in enumerate(t)
        ]
    torch.testing.assert_close(out, torch.cat(alone), atol=1e-6, rtol=0)
    out.square().mean().backward()
    grads = {
        (name, key): p.grad is not None
        for name, model in (("high", high), ("low", low))
        for _, layer in tsm.expert_layers(model)
        for key, p in layer.lora_B.items()
    }
    # 880 -> high s0_i0 ([875, 937.5)), 990 -> high s0_i1 ([937.5, T]), 100 -> low s0_i0 ([0, 437.5))
    assert {k for k, g in grads.items() if g} == {("high", "s0_i0"), ("high", "s0_i1"), ("low", "s0_i0")}


# ---------------------------------------------------------------------------------------------------------
# tsm train
# ---------------------------------------------------------------------------------------------------------
CONFIG = Path(__file__).resolve().parents[1] / "tsm" / "configs" / "wan_foster.yaml"


def shipped_config_args(model, clips, output_dir) -> list[str]:
    """The packaged wan_foster config at tiny sizes: 5-frame 32x32 clips, rank 2, 2 steps of batch 2."""
    return [
        "train", str(CONFIG), f"model.path={model}", f"data.path={clips}", f"data.resolution={RES}",
        f"data.num_frames={FRAMES}", "experts.rank=2", "experts.alpha=2", "train.steps=2", "train.batch_size=2",
        "train.grad_accum=1", "train.mixed_precision='no'", "train.checkpoint_every=2", "train.validation_steps=2",
        f"train.output_dir={output_dir}",
    ]  # fmt: skip


def test_shipped_config_is_wan_21_13b():
    from tsm.config import load_config

    assert CONFIG.read_text().startswith("# tsm train wan_foster ")
    cfg = load_config(CONFIG)
    assert (cfg.model.family, cfg.model.path) == ("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert (cfg.data.num_frames - 1) % 4 == 0 and cfg.data.resolution % 16 == 0  # 81 frames, 480 px


def test_tsm_train_end_to_end_on_clips(folders, tmp_path, capsys):
    clips = write_digit_clips(tmp_path / "clips", n=2, frames=FRAMES, size=RES)
    run = tmp_path / "run"
    assert main(shipped_config_args(folders["2.1"], clips, run)) == 0, capsys.readouterr().err
    for name in ("transformer.safetensors", "summary.json", "samples/final.png", "checkpoints/step_0000002"):
        assert (run / name).exists(), name
    assert not (run / "text_encoder.safetensors").exists()  # UMT5 frozen: Wan LoRAs tune the transformer
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    weights = load_file(run / "transformer.safetensors")
    # the packaged form: 4 interval experts beside one shared full-range LoRA (experts.shared_rank)
    assert {k.rsplit(".", 1)[1] for k in weights if ".lora_B." in k} == {f"s0_i{i}" for i in range(4)}
    shared = [v for k, v in weights.items() if k.endswith("shared_B")]
    assert shared and all(v.shape[1] == 32 for v in shared)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".lora_B." in k)  # experts trained
    assert any(".attn2.to_k." in k for k in weights)  # cross-attention too
    # a clip length the VAE cannot take: one line naming the rule and the nearest valid counts
    assert main([*shipped_config_args(folders["2.1"], clips, tmp_path / "bad"), "data.num_frames=4"]) != 0
    assert "num_frames = 4k + 1" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(folders, tmp_path):
    f = get_family("wan")
    with pytest.raises(tsm.TsmError, match="leave model.prediction_type unset"):
        f.load(str(folders["2.1"]), prediction_type="epsilon")
    ti2v = (
        tmp_path / "ti2v"
    )  # Wan 2.2 TI2V's per-token timesteps (tests/test_wan22_ti2v.py): loaded, not refused
    ti2v.mkdir()
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (ti2v / sub).symlink_to(folders["2.1"] / sub)
    index = json.loads((folders["2.1"] / "model_index.json").read_text())
    (ti2v / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": True}))
    assert f.load(str(ti2v)).extra["expand_timesteps"]
    assert "expand_timesteps" not in f.load(str(folders["2.1"])).extra
    # image-to-video with extra input channels: one line naming what is missing
    (ti2v / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(tsm.TsmError, match="first frame's VAE latents"):
        f.load(str(ti2v))


def test_an_exported_expert_is_a_wan_lora_diffusers_loads(folders, tmp_path):
    """export_lora's file through WanPipeline.load_lora_weights: the plain pipeline's transformer at t in the
    expert's interval is tsm's routed transformer."""
    f = get_family("wan")
    c = f.load(str(folders["2.1"]))
    tsm.add_experts(c.denoiser, tsm.ExpertSpec(scales=(4, 1), rank=2, targets=ATTN))
    randomize_experts(c.denoiser, std=0.3)
    tsm.export_lora(c.denoiser, tmp_path / "expert.safetensors", scale=0, index=3)
    pipe = WanPipeline.from_pretrained(folders["2.1"])
    pipe.load_lora_weights(tmp_path / "expert.safetensors")
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = f.encode_prompt(c, ["a digit"])
    t = torch.tensor([900])  # expert 3 of 4: [750, 1000]
    with torch.no_grad():
        ours = f.denoise(c, x, t, cond)
        theirs = pipe.transformer(hidden_states=x, timestep=t, return_dict=False, **cond)[0]
        with tsm.experts_off(c.denoiser):
            base = f.denoise(c, x, t, cond)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (base - ours).abs().max() > 1e-3


def test_a_musubi_tuner_lora_of_attention_only_imports(folders, tmp_path):
    """musubi-tuner's Wan keys (lora_unet_blocks_N_self_attn_q.lora_down.weight / .lora_up.weight / .alpha),
    attention layers only (no ffn_0 / ffn_2, which diffusers' musubi converter requires): an exported expert
    renamed to those keys imports back as the same expert, weights and velocity."""
    f = get_family("wan")
    spec = tsm.ExpertSpec(scales=(4, 1), rank=2, alpha=4, targets=ATTN)
    c = f.load(str(folders["2.1"]))
    tsm.add_experts(c.denoiser, spec)
    randomize_experts(c.denoiser, std=0.3)
    exported = load_file(tsm.export_lora(c.denoiser, tmp_path / "expert.safetensors", scale=0, index=3))
    wan = {
        "attn1": "self_attn",
        "attn2": "cross_attn",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "o",
    }
    musubi = {}
    for key, value in exported.items():
        m = re.fullmatch(
            r"transformer\.blocks\.(\d+)\.(attn[12])\.(to_[qkv]|to_out\.0)\.lora_([AB])\.weight", key
        )
        module = f"lora_unet_blocks_{m[1]}_{wan[m[2]]}_{wan[m[3]]}"
        if m[4] == "A":
            musubi[f"{module}.lora_down.weight"] = value
            musubi[f"{module}.alpha"] = torch.tensor(1.0)  # alpha / rank = 1/2 at load: lora_up doubled below
        else:
            musubi[f"{module}.lora_up.weight"] = value * 2
    assert len(musubi) == 2 * 8 * 3 and not any("ffn" in k for k in musubi)  # 2 blocks x 8 layers x 3 keys
    save_file(musubi, tmp_path / "musubi.safetensors")
    other = f.load(str(folders["2.1"]))
    tsm.add_experts(other.denoiser, spec)
    summary = tsm.import_lora(other.denoiser, tmp_path / "musubi.safetensors", scale=0, index=3)
    assert len(summary["loaded"]) == 16 and summary["missing"] == []
    ours, theirs = dict(tsm.expert_layers(c.denoiser)), dict(tsm.expert_layers(other.denoiser))
    for name, layer in ours.items():
        delta = layer.scaling * layer.lora_B["s0_i3"] @ layer.lora_A["s0_i3"]
        back = theirs[name].scaling * theirs[name].lora_B["s0_i3"] @ theirs[name].lora_A["s0_i3"]
        torch.testing.assert_close(back, delta, atol=1e-6, rtol=0)
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, t = f.encode_prompt(c, ["a digit"]), torch.tensor([900])  # expert 3 of 4
    with torch.no_grad():
        want, got = f.denoise(c, x, t, cond), f.denoise(other, x, t, cond)
        with tsm.experts_off(other.denoiser):
            base = f.denoise(other, x, t, cond)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (base - got).abs().max() > 1e-3
