"""The sdxl family on a tiny random StableDiffusionXLPipeline folder, loaded with the real from_pretrained code.

Checked against diffusers itself: prompt embeddings and time ids against the pipeline's ``encode_prompt`` /
``_get_add_time_ids``; tsm's sampler against the pipeline's ``__call__`` (zeros as the negative embeddings,
Euler, guidance 5); an unchanged pipeline routing tsm experts by its timesteps; exported experts loaded with
``pipe.load_lora_weights`` into both text encoders and the UNet; the training step against the lines of
``examples/text_to_image/train_text_to_image_lora_sdxl.py``; `tsm train` end to end with per-image size
conditioning from the data, with and without the text-embedding cache.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import randomize_experts
from PIL import Image
from safetensors.torch import load_file
from tiny_models import write_tiny_sdxl

import tsm
from tsm.cli import main
from tsm.config import load_config
from tsm.models import get_family
from tsm.models.sdxl import SDXL, _force_zeros_for_empty_prompt
from tsm.recipes.base import DiffusionLoss
from tsm.recipes.run import build
from tsm.sampling import sample

PROMPTS = ["a red cat", "two dogs"]
TEXT = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


def pipeline(folder: Path, **parts):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model(folder: Path, scales: str, *overrides: str):
    """The model `tsm train` builds: experts on the UNet and on both text encoders, random non-zero B."""
    cfg = load_config(
        None, ["model.family=sdxl", f"model.path={folder}", f"experts.scales={scales}", *overrides]
    )
    c = build(cfg, torch.device("cpu"), torch.float32)
    for seed, m in enumerate(c.modules().values()):
        randomize_experts(m, std=0.3, seed=seed + 1)
    return c


def merged_lora(c, tmp_path: Path, scale: int, index: int) -> dict[str, torch.Tensor]:
    """Expert (scale, index) of the UNet and both text encoders, exported with their component prefixes."""
    out = {}
    for name, m in c.modules().items():
        out.update(load_file(tsm.export_lora(m, tmp_path / f"{name}.safetensors", scale, index, prefix=name)))
    return out


# ---------------------------------------------------------------------------------------------------------
def test_prompt_embeddings_and_time_ids_are_the_pipelines(folder, tmp_path):
    c = get_family("sdxl").load(str(folder))
    assert type(c.scheduler).__name__ == "EulerDiscreteScheduler"  # the folder's own, as the pipeline's
    assert [type(c.text_encoders[k]).__name__ for k in TEXT] == [
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
    ]
    pipe = pipeline(folder)
    with torch.no_grad():
        ours = c.family.encode_prompt(c, PROMPTS)
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True
        )
    assert ours["encoder_hidden_states"].shape == (2, 16, 64)  # both penultimate states side by side
    torch.testing.assert_close(ours["encoder_hidden_states"], emb, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)
    assert not torch.equal(pooled[0], pooled[1])
    # no negative prompt: the pipeline's zeros (force_zeros_for_empty_prompt), and tsm's
    assert neg.abs().sum() == 0 and neg_pooled.abs().sum() == 0 and c.family.zero_negative(c, "")
    assert not c.family.zero_negative(c, "blurry")

    sizes, crops = [(1024, 768), (512, 2048)], [(0, 32), (17, 0)]
    latents = torch.zeros(2, 4, 8, 12)  # target (16, 24): the VAE's x2
    time_ids = c.family.size_conditioning(c, ours, latents, sizes, crops)["time_ids"]
    expected = torch.cat(
        [
            pipe._get_add_time_ids(s, k, (16, 24), torch.float32, text_encoder_projection_dim=32)
            for s, k in zip(sizes, crops, strict=True)
        ]
    )
    torch.testing.assert_close(time_ids, expected, rtol=0, atol=0)
    sampled = c.family.size_conditioning(c, ours, latents)["time_ids"]  # sampling: original = target, crop 0
    assert sampled.tolist() == [[16, 24, 0, 0, 16, 24]] * 2
    with pytest.raises(tsm.TsmError, match="original_sizes"):
        c.family.size_conditioning(c, ours, latents, sizes[:1], crops)

    index = json.loads((folder / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    assert _force_zeros_for_empty_prompt(str(folder), None) and not _force_zeros_for_empty_prompt(
        str(tmp_path), None
    )


def test_sampling_defaults_are_the_pipelines():
    from diffusers import StableDiffusionXLPipeline

    params = inspect.signature(StableDiffusionXLPipeline.__call__).parameters
    f = get_family("sdxl")
    assert (f.default_steps, f.default_guidance) == (50, 5.0)
    assert (f.default_steps, f.default_guidance) == (
        params["num_inference_steps"].default,
        params["guidance_scale"].default,
    )


def test_tsm_sample_is_the_pipeline_with_the_exported_expert(folder, tmp_path):
    """One expert (method lora) on the UNet and both text encoders: tsm's sampler, and the unchanged pipeline
    with that expert exported and loaded by ``load_lora_weights``, draw the same images."""
    c = model(folder, "[1]", "train.method=lora")
    seeds = [3, 4]
    ours = sample(c, PROMPTS, seeds, steps=4, guidance_scale=5.0, resolution=16, progress=False)

    def draw(pipe) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        kw = dict(num_inference_steps=4, guidance_scale=5.0, height=16, width=16, output_type="pt")
        return pipe(PROMPTS, generator=gens, **kw).images

    pipe = pipeline(folder)
    base = draw(pipe)
    pipe.load_lora_weights(merged_lora(c, tmp_path, 0, 0))
    theirs = draw(pipe)
    ours01 = (ours + 1) / 2  # tsm: [-1, 1]; the pipeline: [0, 1]
    diff, effect = (ours01 - theirs).abs().max().item(), (base - theirs).abs().max().item()
    print(
        f"\n[sdxl] tsm.sample vs pipeline + LoRA: max |d| {diff:.3g} (the LoRA moves pixels by {effect:.3g})"
    )
    assert effect > 1e-2  # the experts change the image: the comparison can fail
    torch.testing.assert_close(ours01, theirs, rtol=0, atol=1e-4)


def test_unchanged_pipeline_routes_experts_and_loads_an_exported_one(folder, tmp_path):
    """StableDiffusionXLPipeline with tsm's modules routes the UNet's expert of each step's t; on timesteps
    that all lie in expert 1 of 2 (text encoders routed there too) its image is the pipeline's with expert
    (0, 1) of all three modules exported and loaded with load_lora_weights."""
    c = model(folder, "[8,1]")
    parts = {"unet": c.denoiser, **{k: c.text_encoders[k] for k in TEXT}}
    for k in TEXT:
        tsm.set_timesteps(c.text_encoders[k], torch.tensor(0.0))  # text encoders have no timestep
    ours = pipeline(folder, **parts)
    calls = []

    def record(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        calls.append((t.clone(), kwargs["added_cond_kwargs"]["time_ids"].clone()))

    c.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    routing = tsm.get_routing(c.denoiser)
    ids = []
    c.denoiser.register_forward_hook(lambda *_: ids.append(routing.state.main.ids.clone()))
    kw = dict(guidance_scale=5.0, height=16, width=24, output_type="pt")
    ours(PROMPTS[:1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), **kw)
    steps = ours.scheduler.timesteps
    assert [int(t) for t, _ in calls] == steps.tolist() == [751, 501, 251, 1]
    assert [i.tolist() for i in ids] == [[int(tsm.expert_index(t, 8, 1000))] * 2 for t in steps]  # CFG halves
    assert all(ti.tolist() == [[16, 24, 0, 0, 16, 24]] * 2 for _, ti in calls)

    c = model(folder, "[2,1]")  # fresh pipelines: no hooks
    parts = {"unet": c.denoiser, **{k: c.text_encoders[k] for k in TEXT}}
    for k in TEXT:
        tsm.set_timesteps(c.text_encoders[k], torch.tensor(700.0))
    timesteps = [999, 899, 799, 699, 599]  # all in [500, 1000): expert 1 of 2 at every step

    def draw(pipe) -> torch.Tensor:
        return pipe(PROMPTS, timesteps=timesteps, generator=torch.Generator().manual_seed(0), **kw).images

    expected = draw(pipeline(folder, **parts))
    pipe = pipeline(folder)
    base = draw(pipe)
    pipe.load_lora_weights(merged_lora(c, tmp_path, 0, 1))
    got = draw(pipe)
    diff, effect = (got - expected).abs().max().item(), (base - expected).abs().max().item()
    print(
        f"\n[sdxl] pipeline + exported expert vs tsm experts: max |d| {diff:.3g} (expert effect {effect:.3g})"
    )
    assert effect > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_training_step_is_train_text_to_image_lora_sdxl(folder):
    """DiffusionLoss against the script's lines (compute_time_ids, encode_prompt, unet call, mse), with the
    same latents, noise, timesteps, captions and per-image sizes: same loss, same LoRA gradients."""
    from diffusers import DDPMScheduler

    c = model(folder, "[1]", "train.method=lora", "experts.text_targets=[]")
    c.denoiser.train()
    unet, te1, te2 = c.denoiser, c.text_encoders["text_encoder"], c.text_encoders["text_encoder_2"]
    tokenizers = [c.tokenizers["tokenizer"], c.tokenizers["tokenizer_2"]]
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    captions = ["a cat", "", "a red dog on a mat"]
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([3, 500, 999])
    original_sizes, crop_top_lefts = [(20, 30), (16, 16), (64, 17)], [(2, 7), (0, 0), (24, 0)]
    resolution = 16

    def script() -> torch.Tensor:  # the script's lines, its variable names
        def tokenize_prompt(tokenizer, prompt):
            return tokenizer(
                prompt,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids

        def encode_prompt(text_encoders, text_input_ids_list):
            prompt_embeds_list = []
            for i, text_encoder in enumerate(text_encoders):
                prompt_embeds = text_encoder(
                    text_input_ids_list[i], output_hidden_states=True, return_dict=False
                )
                pooled_prompt_embeds = prompt_embeds[0]
                prompt_embeds = prompt_embeds[-1][-2]
                bs_embed, seq_len, _ = prompt_embeds.shape
                prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
            return torch.concat(prompt_embeds_list, dim=-1), pooled_prompt_embeds.view(bs_embed, -1)

        def compute_time_ids(original_size, crops_coords_top_left):
            target_size = (resolution, resolution)
            return torch.tensor(
                [list(original_size + crops_coords_top_left + target_size)], dtype=torch.float32
            )

        noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)
        add_time_ids = torch.cat(
            [compute_time_ids(s, k) for s, k in zip(original_sizes, crop_top_lefts, strict=True)]
        )
        unet_added_conditions = {"time_ids": add_time_ids}
        ids = [tokenize_prompt(tok, captions) for tok in tokenizers]
        prompt_embeds, pooled_prompt_embeds = encode_prompt([te1, te2], ids)
        unet_added_conditions.update({"text_embeds": pooled_prompt_embeds})
        model_pred = unet(
            noisy_model_input,
            timesteps,
            prompt_embeds,
            added_cond_kwargs=unet_added_conditions,
            return_dict=False,
        )[0]
        return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")

    def loss_and_grads(forward):
        params = tsm.adapter_params(unet)
        for p in params:
            p.grad = None
        loss = forward()
        loss.backward()
        grads = [p.grad.clone() for p in params]
        return loss.detach(), grads

    ours = loss_and_grads(
        lambda: DiffusionLoss(c)(latents, noise, timesteps, captions, original_sizes, crop_top_lefts).mean()
    )
    theirs = loss_and_grads(script)
    d_loss = (ours[0] - theirs[0]).abs().item()
    d_grad = max((a - b).abs().max().item() for a, b in zip(ours[1], theirs[1], strict=True))
    scale = max(g.abs().max().item() for g in theirs[1])
    print(
        f"\n[parity] sdxl: loss {theirs[0].item():.6f}, |d loss| {d_loss:.3g}, max |d grad| {d_grad:.3g} of {scale:.3g}"
    )
    assert scale > 0
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=0)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale)
    # the sizes matter: without them (target size, crop 0) the loss is another
    other = DiffusionLoss(c)(latents, noise, timesteps, captions).mean()
    assert (other - theirs[0]).abs() > 1e-6


# ---------------------------------------------------------------------------------------------------------
def write_images(root: Path) -> Path:
    """Two non-square images of one caption: center-cropping to 16 x 16 cuts at (top, left) = (0, 8) from
    the 32 x 16 one and at (4, 0) from the 16 x 24 one."""
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in {"wide": (32, 16), "tall": (16, 24)}.items():
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text("a picture")  # one caption: cached once, sizes still per image
    return root


def test_tsm_train_end_to_end_with_size_conditioning(folder, tmp_path, monkeypatch, capsys):
    images = write_images(tmp_path / "images")
    seen: list[tuple] = []  # every training call's time ids (sampling runs in eval mode)

    def record(module, args, kwargs):
        if module.training:
            seen.extend(tuple(int(v) for v in row) for row in kwargs["added_cond_kwargs"]["time_ids"])

    original_load = SDXL.load

    def load(self, *a, **kw):
        c = original_load(self, *a, **kw)
        c.denoiser.register_forward_pre_hook(record, with_kwargs=True)
        return c

    monkeypatch.setattr(SDXL, "load", load)
    expected = {(16, 32, 0, 8, 16, 16), (24, 16, 4, 0, 16, 16)}  # (original h, w, top, left, target H, W)
    for method, text_targets in (("foster", None), ("lora", [])):  # text experts on both; frozen + cached
        run = tmp_path / method
        cfg = {
            "model": {"family": "sdxl", "path": str(folder)},
            "experts": {"scales": [2, 1], "rank": 2, "alpha": 2, "text_targets": text_targets},
            "data": {"path": str(images), "resolution": 16, "cache_dir": str(tmp_path / "cache")},
            "optim": {"lr": 1e-3},
            "train": {"method": method, "steps": 2, "batch_size": 2, "output_dir": str(run), "log_with": "none",
                      "validation_prompts": ["a picture"], "validation_seeds": [0], "validation_steps": 2},
        }  # fmt: skip
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
        seen.clear()
        assert main(["train", str(tmp_path / f"{method}.yaml")]) == 0, capsys.readouterr().err
        assert set(seen) == expected and len(seen) == 4, seen  # 2 steps x 2 images, each its own sizes
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]
        assert (run / "samples" / "final.png").is_file()
        trained = ["unet", *(TEXT if text_targets is None else ())]
        assert sorted(p.stem for p in run.glob("*.safetensors")) == sorted(trained)
        for name in trained:
            weights = load_file(run / f"{name}.safetensors")
            assert any(v.abs().sum() > 0 for k, v in weights.items() if ".lora_B." in k), name
    entries = [set(load_file(f)) for f in (tmp_path / "cache").rglob("*.safetensors")]
    # the frozen encoders' embeddings: one entry for the one caption (the size conditioning is not in it)
    assert entries.count({"encoder_hidden_states", "text_embeds"}) == 1, entries

    for name in ("unet", *TEXT):  # tsm export names each component as load_lora_weights expects it
        out = tmp_path / f"{name}_expert.safetensors"
        assert main(["export", str(tmp_path / "foster"), "--module", name, "--scale", "0", "--index", "1",
                     "--out", str(out)]) == 0  # fmt: skip
        keys = list(load_file(out))
        assert keys and all(k.startswith(f"{name}.") for k in keys), keys[:2]
