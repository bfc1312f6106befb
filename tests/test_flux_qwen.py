"""The flux and qwen families on tiny random FLUX.1-dev-like and Qwen-Image-like folders (from_pretrained).

Each family must: load a diffusers-layout folder; give the same images as the diffusers pipeline built from
the same parts (so packing, RoPE ids, timestep scaling, guidance embedding, text template, resolution shift
and latent normalisation all match); route its experts on t in [0, 1000] from the transformer's t / 1000; and
give Glance the pipeline's own shifted sigmas.
"""

import numpy as np
import pytest
import torch
from conftest import randomize_experts
from tiny_models import write_tiny_model

import tsm
from tsm.models import get_family, pack_latents
from tsm.recipes.glance import FAST, SLOW, glance_timesteps
from tsm.sampling import sample

RESOLUTION = {"flux": 16, "qwen": 32}  # 8x8 latents for both (VAE x2 and x4): 4x4 = 16 tokens
T = torch.tensor([100.0, 900.0])  # experts 0 and 3 of 4


@pytest.fixture(scope="module", params=["flux", "qwen"])
def folder(request, tmp_path_factory):
    name = request.param
    return name, str(write_tiny_model(name, tmp_path_factory.mktemp(name))), RESOLUTION[name]


def noise(c, resolution: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    shape = c.family.latent_shape(c, resolution, 1)
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def pipeline(c):
    """The diffusers pipeline of the family, built from the very modules ``c`` holds."""
    from diffusers import FluxPipeline, QwenImagePipeline

    parts = dict(scheduler=c.scheduler, vae=c.vae, transformer=c.denoiser, **c.text_encoders, **c.tokenizers)
    pipe = (FluxPipeline if c.family.name == "flux" else QwenImagePipeline)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(c, resolution: int, **kw) -> torch.Tensor:
    """The pipeline's own 2-step images for "a cat" from seed 0's noise (packed as the pipeline packs), in [-1, 1]."""
    if c.family.name == "flux":  # T5 padded as the family pads it (512 for FLUX.1-dev's tokenizer)
        kw.update(max_sequence_length=c.tokenizers["tokenizer_2"].model_max_length, guidance_scale=3.5)
    images = pipeline(c)(
        prompt="a cat",
        latents=pack_latents(noise(c, resolution, batch=1)),
        num_inference_steps=2,
        height=resolution,
        width=resolution,
        output_type="pt",
        **kw,
    ).images
    return images * 2 - 1


# ------------------------------------------------------------------------------------------------
def test_folder_loads_with_its_own_classes_and_shapes(folder):
    name, path, resolution = folder
    c = get_family(name).load(path)
    want = {
        "flux": ("FluxTransformer2DModel", "AutoencoderKL"),
        "qwen": ("QwenImageTransformer2DModel", "AutoencoderKLQwenImage"),
    }
    assert (type(c.denoiser).__name__, type(c.vae).__name__) == want[name]
    assert c.family.timestep_scale == 1000.0 and c.objective.num_timesteps == 1000
    cond = c.family.encode_prompt(c, ["a cat", "", "a red cat on a mat"])
    assert all(v.shape[0] == 3 for v in cond.values())  # batch first: CFG concatenates along it
    if name == "flux":
        assert cond["guidance"].tolist() == [3.5] * 3  # FLUX.1-dev embeds the guidance scale
    else:  # each prompt's tokens after the template prefix, zero-padded to one length, the padding masked
        tok, drop = c.tokenizers["tokenizer"], c.family.prompt_template_start
        prefix = c.family.prompt_template.split("{}")[0]
        assert len(tok(prefix).input_ids) == drop == 34  # the tiny vocabulary tokenizes it as Qwen2.5's does
        lengths = [
            len(tok(c.family.prompt_template.format(p)).input_ids) - drop
            for p in ("a cat", "", "a red cat on a mat")
        ]
        assert cond["encoder_hidden_states_mask"].sum(1).tolist() == lengths
        assert cond["encoder_hidden_states"][cond["encoder_hidden_states_mask"] == 0].abs().sum() == 0
    x = noise(c, resolution)
    assert x.shape == (2, 4, 8, 8)
    with torch.no_grad():
        pred = c.family.denoise(c, x, T, {k: v[:2] for k, v in cond.items()})
        assert pred.shape == x.shape
        pixels = torch.rand(2, 3, resolution, resolution) * 2 - 1
        mean, std = c.family.latent_dist(c, pixels)
        assert mean.shape == std.shape == x.shape
        images = c.family.decode(c, c.family.scale_latents(c, mean))
        # scale_latents is decode's normalisation undone: the VAE itself decodes the raw latents the same
        raw = c.vae.decode(mean[:, :, None] if name == "qwen" else mean).sample
        raw = (raw[:, :, 0] if name == "qwen" else raw).clamp(-1, 1)
    assert images.shape == pixels.shape and images.abs().max() <= 1
    torch.testing.assert_close(images, raw, atol=1e-5, rtol=0)
    with pytest.raises(tsm.TsmError, match="divisible"):
        c.family.latent_shape(c, resolution + 2, 1)


def test_sampling_equals_the_diffusers_pipeline(folder):
    name, path, resolution = folder
    c = get_family(name).load(path)
    ours = sample(c, ["a cat"], [0], steps=2, guidance_scale=1.0, resolution=resolution, progress=False)
    assert ours.shape == (1, 3, resolution, resolution) and ours.abs().max() <= 1
    theirs = pipeline_images(c, resolution)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert ours.std() > 1e-3  # not a constant image
    # the shared CFG batch [uncond; cond] equals the pipelines' true CFG with an empty negative prompt
    # (Qwen-Image's rescales the guided velocity to the conditional one's norm: `Qwen.guide`)
    ours = sample(c, ["a cat"], [0], steps=2, guidance_scale=2.0, resolution=resolution, progress=False)
    theirs = pipeline_images(c, resolution, true_cfg_scale=2.0, negative_prompt="")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if name == "qwen":  # the rescale matters: plain CFG gives other images
        c.family.guide = lambda u, v, s: u + s * (v - u)
        other = sample(c, ["a cat"], [0], steps=2, guidance_scale=2.0, resolution=resolution, progress=False)
        assert (other - theirs).abs().max() > 1e-3


def test_experts_route_on_t_from_the_scaled_timestep(folder):
    name, path, resolution = folder
    c = get_family(name).load(path)
    family = c.family
    cond, x = family.encode_prompt(c, ["a cat", "a dog"]), noise(c, resolution)
    with torch.no_grad():
        base = family.denoise(c, x, T, cond)
    spec = tsm.ExpertSpec(
        scales=(4,), rank=2, targets=family.default_targets, timestep_scale=family.timestep_scale
    )
    tsm.add_experts(c.denoiser, spec)
    names = [n for n, _ in tsm.expert_layers(c.denoiser)]
    if name == "flux":  # the single-stream blocks' attention too
        assert any(n.startswith("single_transformer_blocks.") and n.endswith("attn.to_q") for n in names)
    with torch.no_grad():
        out = family.denoise(c, x, T, cond)
        assert tsm.get_routing(c.denoiser).state.main.ids.tolist() == [0, 3]
        assert torch.equal(out, base)  # zero-initialised experts
        randomize_experts(c.denoiser)
        assert (family.denoise(c, x, T, cond) - base).abs().max() > 1e-4

    # a fostering step: each sample trains the expert of its t, and only that one
    c.denoiser.train()
    params = dict(c.denoiser.named_parameters())
    loss = c.objective.loss(family.denoise(c, x, T, cond), x, torch.randn_like(x), T).sum()
    loss.backward()
    trained = {
        n.rsplit(".", 1)[-1]
        for n, p in params.items()
        if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0
    }
    assert trained == {"s0_i0", "s0_i3"}


def test_glance_timesteps_are_the_pipelines_shifted_sigmas(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    name, path, resolution = folder
    c = get_family(name).load(path)
    ts = glance_timesteps(c, resolution=resolution)

    # the reference: a fresh scheduler set as the pipelines set it for an 8x8 latent (16 tokens)
    ref = FlowMatchEulerDiscreteScheduler.from_config(c.scheduler.config)
    cfg = ref.config
    mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=mu)
    sigmas = ref.sigmas.tolist()
    assert ts["slow"] == [sigmas[k - 1] * 1000 for k in SLOW]
    assert ts["fast"] == [sigmas[k - 1] * 1000 for k in FAST]
    assert ts["final"] == sigmas[-1] * 1000 and min(ts["slow"]) > ts["cut"] > max(ts["fast"])
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=mu + 0.5)  # and mu matters
    assert ts["slow"] != [ref.sigmas.tolist()[k - 1] * 1000 for k in SLOW]
