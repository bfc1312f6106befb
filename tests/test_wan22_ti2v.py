"""Wan 2.2 TI2V-5B (``expand_timesteps``: one timestep per latent token) on a tiny random folder written by
WanPipeline.save_pretrained: the experts' pre-hook routes a (B, L) timestep by each sample's noised tokens, the
family passes WanPipeline's per-token timesteps and Wan 2.2's 48-channel latents, `tsm train` writes experts,
and tsm's sampler draws WanPipeline's frames (experts routed inside the unmodified pipeline; the exported LoRA
loaded in the unchanged pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_experts
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file
from test_wan import ATTN, FRAMES, GUIDANCE, PROMPTS, SEEDS, STEPS, call_pipeline
from tiny_models import write_digit_clips, write_tiny_wan_ti2v

import tsm
from tsm.cli import main
from tsm.intervals import expert_index
from tsm.models import get_family

RES = 64  # latents (48, 2, 4, 4) of test_wan's 5-frame clips: 2 latent frames of 2 x 2 tokens, L = 8
# max difference on [-1, 1] (1.4e-6 and 2.2e-6 measured): CFG as one [uncond; cond] batch here, two calls there
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ti2v")
    return {
        "model": write_tiny_wan_ti2v(root / "ti2v"),
        "clips": write_digit_clips(root / "clips", n=2, frames=FRAMES, size=RES),
    }


def train_args(assets: dict, run: Path, *more: str) -> list[str]:
    """The packaged wan_foster config on the TI2V folder at tiny sizes: 2 steps of 2 clips, float32."""
    return [
        "train", "wan_foster", f"model.path={assets['model']}", f"data.path={assets['clips']}",
        f"data.resolution={RES}", f"data.num_frames={FRAMES}", "experts.rank=2", "experts.alpha=2",
        "experts.scales=[2,1]", "train.steps=2", "train.batch_size=2", "train.grad_accum=1",
        "train.mixed_precision='no'", "train.gradient_checkpointing=false", "train.validation_prompts=[]",
        "train.log_with=none", f"train.output_dir={run}", *more,
    ]  # fmt: skip


def record_timesteps(model: torch.nn.Module, log: list) -> None:
    """After every forward: (the timestep argument, the core expert of every sample)."""

    def hook(module, args, kwargs, output):
        log.append((kwargs["timestep"].clone(), tsm.get_routing(module).state.main.ids.tolist()))

    model.register_forward_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------------------------------------
def test_a_per_token_timestep_routes_each_sample_by_its_noised_tokens(assets):
    """(B, L) timesteps with the first latent frame's tokens at 0 (image-conditioned TI2V): each sample goes to
    the expert of its noised tokens' t, as its (B,) timestep would send it."""
    model = WanTransformer3DModel.from_pretrained(assets["model"] / "transformer")
    tsm.add_experts(model, tsm.ExpertSpec(scales=(4, 1), rank=2, targets=ATTN)).eval()
    x = torch.randn(2, 48, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 300.0])
    per_token = t[:, None].repeat(1, 8)  # (B, L): 2 latent frames of 2 x 2 tokens
    per_token[:, :4] = 0.0  # the clean conditioning frame
    routing = tsm.get_routing(model)
    with torch.no_grad():
        model(hidden_states=x, timestep=per_token, encoder_hidden_states=text)
        assert routing.state.main.ids.tolist() == expert_index(t, 4).tolist() == [3, 1]
        model(hidden_states=x, timestep=torch.tensor([0.0, 0.0]), encoder_hidden_states=text)
        assert routing.state.main.ids.tolist() == [0, 0]
        model(hidden_states=x, timestep=per_token[[1, 0]], encoder_hidden_states=text)  # not the first token
        assert routing.state.main.ids.tolist() == [1, 3]


def test_the_family_passes_the_pipelines_timesteps_and_latents(assets):
    f = get_family("wan")
    c = f.load(str(assets["model"]))
    assert c.extra["expand_timesteps"] and "transformer_2" not in c.extra
    assert c.denoiser.config.in_channels == c.vae.config.z_dim == 48
    # latents: Wan 2.2's VAE, x16 space (2x2 pixel patches, then x8), 48 channels, latents_mean/std per channel
    assert f.latent_shape(c, RES, FRAMES) == (48, 2, 4, 4)
    with pytest.raises(tsm.TsmError, match="divisible by 32"):
        f.latent_shape(c, 48, FRAMES)
    clip = torch.rand(1, 3, FRAMES, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = f.latent_dist(c, clip)
    vae_mean = torch.tensor(c.vae.config.latents_mean).view(1, 48, 1, 1, 1)
    vae_inv_std = 1.0 / torch.tensor(c.vae.config.latents_std).view(
        1, 48, 1, 1, 1
    )  # as the pipeline writes it
    z = f.scale_latents(c, mean)
    torch.testing.assert_close(z, (mean - vae_mean) * vae_inv_std)
    torch.testing.assert_close(f.decode(c, z), c.vae.decode(z / vae_inv_std + vae_mean).sample.clamp(-1, 1))
    # the timestep: WanPipeline's (mask[0][0][:, ::2, ::2] * t).flatten(), one row per sample
    seen: list = []
    c.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    x = torch.randn(2, 48, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = {k: v.expand(2, -1, -1) for k, v in f.encode_prompt(c, ["a digit"]).items()}
    t = torch.tensor([937, 376])  # UniPC's int64 timesteps
    with torch.no_grad():
        out = f.denoise(c, x, t, cond)
        mask = torch.ones(x.shape, dtype=torch.float32)
        want = torch.stack([(mask[0][0][:, ::2, ::2] * tk).flatten() for tk in t])  # (2, 8)
        assert seen[0].shape == (2, 8) and seen[0].dtype == want.dtype == torch.float32
        assert torch.equal(seen[0], want)
        ref = c.denoiser(hidden_states=x, timestep=want, return_dict=False, **cond)[0]
        assert torch.equal(out, ref)


def test_tsm_train_writes_experts_and_samples_as_wanpipeline_routes_them(assets, tmp_path, capsys):
    from tsm.recipes.run import load_run
    from tsm.sampling import sample

    run = tmp_path / "run"
    assert main(train_args(assets, run, "experts.scales=[4,1]")) == 0, capsys.readouterr().err
    weights = load_file(run / "transformer.safetensors")
    assert {k.rsplit(".", 1)[1] for k in weights if ".lora_B." in k} == {f"s0_i{i}" for i in range(4)} | {
        "s1_i0"
    }
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".lora_B." in k)  # the experts trained
    _, c = load_run(run)
    randomize_experts(c.denoiser, std=0.3)  # far from zero, so that a misrouted expert shows
    log: list = []
    record_timesteps(c.denoiser, log)
    ours = sample(c, PROMPTS, SEEDS, STEPS, GUIDANCE, resolution=RES, num_frames=FRAMES, progress=False)
    ours_log, log[:] = list(log), []
    pipe = WanPipeline.from_pretrained(assets["model"], transformer=c.denoiser,
                                       text_encoder=c.text_encoders["text_encoder"])  # fmt: skip
    assert pipe.config.expand_timesteps
    theirs, theirs_log = call_pipeline(pipe, RES), log
    assert ours.shape == theirs.shape == (2, 3, FRAMES, RES, RES)
    diff = float((ours - theirs).abs().max())
    print(f"max |tsm - WanPipeline| with routed experts: {diff:.2e}")
    assert diff < TOLERANCE, diff
    # the pipeline's (B, 8) per-token timesteps route as tsm's: floor(4 t / 1000) of each step's t
    assert [ts.shape for ts, _ in theirs_log] == [(2, 8)] * (2 * STEPS)
    ts = [float(ts[0, 0]) for ts, _ in theirs_log[::2]]
    assert [ids for _, ids in theirs_log[::2]] == [[int(expert_index(torch.tensor(t), 4))] * 2 for t in ts]
    assert [ids for _, ids in ours_log] == [[int(expert_index(torch.tensor(t), 4))] * 4 for t in ts]
    assert {ids[0] for _, ids in ours_log} == {2, 3}  # flow_shift 5, 6 steps: t from 999 down to 500
    with tsm.experts_off(c.denoiser):
        base = sample(c, PROMPTS, SEEDS, STEPS, GUIDANCE, resolution=RES, num_frames=FRAMES, progress=False)
    assert (base - ours).abs().max() > 1e-2  # the experts matter, far beyond the tolerance


def test_the_exported_lora_in_the_unchanged_pipeline_draws_tsm_samples_frames(assets, tmp_path, capsys):
    from tsm.recipes.run import load_run
    from tsm.sampling import sample

    run = tmp_path / "one"
    assert main(train_args(assets, run, "experts.scales=[1]", "optim.lr=3e-2")) == 0, capsys.readouterr().err
    assert main(["sample", str(run), "--prompt", PROMPTS[0], "--seeds", "0", "--steps", "2"]) == 0
    assert list((run / "samples").glob("sample_*/*.png"))
    lora = tmp_path / "one.safetensors"  # one expert: --out is the file
    assert main(["export", str(run), "--out", str(lora)]) == 0 and lora.is_file()
    _, c = load_run(run)
    ours = sample(c, PROMPTS, SEEDS, STEPS, GUIDANCE, resolution=RES, num_frames=FRAMES, progress=False)
    pipe = WanPipeline.from_pretrained(assets["model"])
    base = call_pipeline(pipe, RES)
    pipe.load_lora_weights(lora)
    theirs = call_pipeline(pipe, RES)
    diff = float((ours - theirs).abs().max())
    print(f"max |tsm - WanPipeline + exported LoRA|: {diff:.2e}")
    assert diff < TOLERANCE, diff
    assert (base - ours).abs().max() > 1e-2  # the LoRA matters


def test_image_to_video_folders(assets, tmp_path):
    """TI2V's transformer in a WanImageToVideoPipeline folder trains as text-to-video too; an image-to-video
    folder without expand_timesteps (A14B I2V's extra input channels) is refused in one line."""
    folder = tmp_path / "i2v"
    folder.mkdir()
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).symlink_to(assets["model"] / sub)
    index = json.loads((assets["model"] / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    assert get_family("wan").load(str(folder)).extra["expand_timesteps"]
    index = {**index, "_class_name": "WanImageToVideoPipeline", "expand_timesteps": False}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(tsm.TsmError, match="first frame's VAE latents"):
        get_family("wan").load(str(folder))
