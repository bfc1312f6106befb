"""Exports that carry the whole model: `tsm export` without --module writes the denoiser's and the text encoders'
expert of one interval into one file (diffusers and kohya names), and `expert_switch_callback` switches the
text experts per interval in an unchanged StableDiffusionXLPipeline, as `tsm sample` does -- on a tiny SDXL run
with experts on the UNet and both CLIP text encoders, checked against diffusers' own loaders. And `--comfyui`
on that run: the run's bucket, trigger and a required --ckpt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_experts
from safetensors.torch import load_file
from tiny_models import write_tiny_sdxl

import tsm
from tsm import comfyui
from tsm.cli import main
from tsm.config import load_config, save_config
from tsm.recipes.run import build, load_run
from tsm.sampling import sample

PROMPTS = ["a red cat", "two dogs"]
TEXT = ("text_encoder", "text_encoder_2")
T_EXPERT_1 = 400  # in [250, 500): expert 1 of 4 at the finest scale


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SDXL folder, and a fostered run on it: random experts (scales [4, 1]) on the UNet and both CLIPs."""
    root = tmp_path_factory.mktemp("export_text")
    folder = write_tiny_sdxl(root / "model")
    run = root / "run"
    cfg = load_config(
        None,
        [f"model.path={folder}", "model.family=sdxl", "experts.scales=[4,1]", "experts.rank=2",
         "experts.alpha=2", f"data.path={root}", "data.resolution=16", f"train.output_dir={run}"],
    )  # fmt: skip
    c = build(cfg, torch.device("cpu"), torch.float32)
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    for seed, (name, module) in enumerate(c.modules().items()):
        tsm.save(randomize_experts(module, std=0.3, seed=seed + 1), run / f"{name}.safetensors")
    return folder, run


def head(key: str) -> str:
    """A kohya key's component: lora_unet_, lora_te_, lora_te1_, lora_te2_."""
    return "_".join(key.split("_")[:2]) + "_"


def pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_with(folder: Path, c):
    """The unchanged pipeline holding tsm's modules (they route their experts themselves)."""
    from diffusers import StableDiffusionXLPipeline

    parts = {"unet": c.denoiser, **{k: c.text_encoders[k] for k in TEXT}}
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def outputs(pipe, t: float) -> dict[str, torch.Tensor]:
    """The pipeline's prompt embeddings and its UNet's prediction at t (what its text encoders and UNet give)."""
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    pred = pipe.unet(x, torch.tensor([t, t]), emb, added_cond_kwargs=cond).sample
    return {"prompt_embeds": emb, "pooled": pooled, "unet": pred}


def test_kohya_file_holds_unet_and_both_text_encoders(sdxl_run, tmp_path, capsys):
    folder, run = sdxl_run
    out = tmp_path / "expert1.safetensors"
    code = main(["export", str(run), "--scale", "0", "--index", "1", "--format", "kohya", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    keys = list(load_file(out))
    heads = {head(k) for k in keys}
    assert heads == {"lora_unet_", "lora_te1_", "lora_te2_"}, heads
    assert "unet + text_encoder + text_encoder_2" in capsys.readouterr().out

    ours = load_run(run)[1]  # tsm's model routed to interval 1 (text encoders have no timestep: set it)
    for name in TEXT:
        tsm.set_timesteps(ours.text_encoders[name], torch.tensor(float(T_EXPERT_1)))
    expected = outputs(pipeline_with(folder, ours), T_EXPERT_1)
    pipe = pipeline(folder)
    base = outputs(pipe, T_EXPERT_1)
    pipe.load_lora_weights(out)  # diffusers' own kohya detection and conversion (lora_te1_ / lora_te2_)
    got = outputs(pipe, T_EXPERT_1)
    diffs = {k: float((got[k] - expected[k]).abs().max()) for k in expected}
    effects = {k: float((base[k] - expected[k]).abs().max()) for k in expected}
    print(f"\n[kohya sdxl] max |kohya file - tsm|: {diffs}; the experts move them by {effects}")
    assert all(e > 1e-3 for e in effects.values()), effects  # text and UNet experts both change the output
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-5)


def test_all_and_steps_carry_every_part(sdxl_run, tmp_path, capsys):
    _, run = sdxl_run
    for fmt, heads in (("diffusers", {"unet", *TEXT}), ("kohya", {"lora_unet_", "lora_te1_", "lora_te2_"})):
        for extra in (["--all"], ["--timesteps", "999", str(T_EXPERT_1)]):
            out = tmp_path / f"{fmt}{extra[0]}"
            assert main(["export", str(run), *extra, "--format", fmt, "--out", str(out)]) == 0
            files = sorted(out.glob("*.safetensors"))
            assert len(files) == (5 if extra == ["--all"] else 2)
            for f in files:
                keys = load_file(f)
                found = {k.split(".")[0] if fmt == "diffusers" else head(k) for k in keys}
                assert found == heads, (f.name, found)
    # the step file at t is expert (0, index of t) of every part
    step = load_file(tmp_path / "kohya--timesteps" / f"t{T_EXPERT_1}.safetensors")
    expert = load_file(tmp_path / "kohya--all" / "expert_s0_i1.safetensors")
    assert step.keys() == expert.keys() and all(torch.equal(step[k], expert[k]) for k in step)
    meta = tsm.io.read_metadata(tmp_path / "diffusers--all" / "expert_s0_i1.safetensors")
    assert json.loads(meta["tsm_components"]) == ["unet", *TEXT]
    # --module keeps one part
    out = tmp_path / "te2.safetensors"
    assert (
        main(["export", str(run), "--module", "text_encoder_2", "--format", "kohya", "--out", str(out)]) == 0
    )
    assert all(k.startswith("lora_te2_") for k in load_file(out))
    capsys.readouterr()


def test_text_parts_per_format():
    assert comfyui.text_parts("kohya", "sdxl") == TEXT and comfyui.text_parts("kohya", "sd15") == TEXT
    assert comfyui.text_parts("kohya", "sd3") == () and comfyui.text_parts("kohya", "flux") == ()
    assert comfyui.text_parts("comfyui", "flux") == ("text_encoder",)  # the CLIP; its T5 has no ComfyUI name
    assert "text_encoder_3" in comfyui.text_parts("diffusers", "sd3")


def test_switch_callback_reencodes_text_experts_as_tsm_sample(sdxl_run, tmp_path):
    """The whole-model files of `tsm export --all` as adapters of an unchanged pipeline: the callback switches
    the UNet's and both text encoders' adapter per interval and re-encodes the prompt; the images equal
    `tsm sample`'s. Switching adapters without re-encoding keeps the first interval's text expert."""
    folder, run = sdxl_run
    _, c = load_run(run)
    steps, seeds = (
        6,
        [3, 4],
    )  # Euler, leading spacing: t = 831, 665, 499, 333, 167, 1 -> intervals 3 2 1 1 0 0
    ours = (sample(c, PROMPTS, seeds, steps=steps, guidance_scale=5.0, resolution=16, progress=False) + 1) / 2

    paths = tsm.export_all_lora(c.modules(), tmp_path)
    pipe = pipeline(folder)
    names = [f"e{i}" for i in range(4)]
    for i, name in enumerate(names):
        pipe.load_lora_weights(tmp_path / f"expert_s0_i{i}.safetensors", adapter_name=name)
    assert len(paths) == 5
    spec = tsm.get_routing(c.denoiser).spec

    def draw(callback) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        kw = dict(num_inference_steps=steps, guidance_scale=5.0, height=16, width=16, output_type="pt")
        return pipe(PROMPTS, generator=gens, callback_on_step_end=callback, **kw).images

    switched = draw(
        tsm.io.expert_switch_callback(pipe, names, spec, num_inference_steps=steps, prompt=PROMPTS)
    )
    assert pipe.scheduler.timesteps.tolist() == [831, 665, 499, 333, 167, 1]

    def adapters_only(pipeline, i, t, kwargs):  # the switch without re-encoding
        timesteps = pipeline.scheduler.timesteps
        if i + 1 < len(timesteps):
            pipeline.set_adapters(names[int(tsm.expert_index(timesteps[i + 1], 4, 1000))])
        return kwargs

    pipe.set_adapters(names[3])
    stale = draw(adapters_only)
    diff, before = float((switched - ours).abs().max()), float((stale - ours).abs().max())
    print(
        f"\n[sdxl callback] max |switched - tsm sample| {diff * 255:.2g}/255, without re-encoding {before * 255:.2g}/255"
    )
    assert before > 1e-3  # the text experts matter: the comparison can fail
    torch.testing.assert_close(switched, ours, rtol=0, atol=1e-4)
    with pytest.raises(tsm.TsmError, match="pass prompt="):
        tsm.io.expert_switch_callback(pipe, names, spec, num_inference_steps=steps)


def test_comfyui_workflow_takes_the_runs_bucket_trigger_and_checkpoint(sdxl_run, tmp_path, capsys):
    """--comfyui: the latent is the run's first bucket (or --width/--height), the prompt starts with the run's
    trigger, and --ckpt is required (one line otherwise)."""
    import shutil

    _, run = sdxl_run
    bucketed = tmp_path / "run"
    shutil.copytree(run, bucketed)
    cfg = load_config(bucketed / "config.yaml", ["data.buckets=[[24,16],[16,24]]", "data.trigger=sks"])
    cfg.train.validation_prompts = ["a red cat"]
    save_config(cfg, bucketed / "config.yaml")

    code = main(["export", str(bucketed), "--comfyui", str(tmp_path / "c0")])
    err = capsys.readouterr().err
    assert code == 2 and "--ckpt" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c0").exists()

    for extra, size in (([], (24, 16)), (["--width", "32", "--height", "48"], (32, 48))):
        out = tmp_path / f"c{size[0]}"
        code = main(["export", str(bucketed), "--comfyui", str(out), "--ckpt", "sdxl.safetensors", *extra])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert (
            "models/loras" in printed.out
            and "text_encoder, text_encoder_2 experts are not in it" in printed.out
        )
        graph = json.loads((out / "workflow_api.json").read_text())
        latent = next(n for n in graph.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
        assert (latent["width"], latent["height"]) == size
        texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
        assert texts == ["sks, a red cat", ""]
        ckpt = next(n for n in graph.values() if n["class_type"] == "CheckpointLoaderSimple")["inputs"]
        assert ckpt["ckpt_name"] == "sdxl.safetensors"


def test_text_experts_without_names_are_left_out_in_one_line(sdxl_run, tmp_path, capsys, monkeypatch):
    """A family whose text encoders have no kohya names (SD3, Flux): the file holds the denoiser, and one printed
    line says which experts are left out and why (SDXL stands in, with its kohya text names switched off)."""
    _, run = sdxl_run
    monkeypatch.setattr(comfyui, "KOHYA_TEXT_FAMILIES", ())
    out = tmp_path / "unet_only.safetensors"
    assert main(["export", str(run), "--format", "kohya", "--out", str(out)]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "text_encoder, text_encoder_2" in notes[0] and "not defined" in notes[0]
    assert {head(k) for k in load_file(out)} == {"lora_unet_"}
