"""`tsm export --module text_encoder_2` writes keys diffusers loads into the second text encoder, not the first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_experts, tiny_clip_text_with_projection
from safetensors.torch import load_file
from tiny_models import write_tiny_model

import tsm
from tsm.cli import main
from tsm.config import config_from_dict, save_config
from tsm.inject import ATTR
from tsm.recipes.run import build

T_EXPERT_1 = 700  # in [500, 1000): expert 1 of 2 at the finest scale


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SD3 model folder, and a run on it with random (non-zero) experts on both CLIP text encoders."""
    root = tmp_path_factory.mktemp("export_prefix")
    model = write_tiny_model("sd3", root / "sd3")
    run = root / "run"
    cfg = config_from_dict(
        {
            "model": {"family": "sd3", "path": str(model)},
            "experts": {"scales": [2, 1], "rank": 2, "alpha": 2},
            "data": {"path": str(root), "resolution": 16},
            "train": {"method": "foster", "output_dir": str(run)},
        }
    )
    c = build(cfg, torch.device("cpu"), torch.float32)
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    for seed, (name, module) in enumerate(c.modules().items()):
        if getattr(module, ATTR, None) is not None:
            tsm.save(randomize_experts(module, std=0.2, seed=seed + 1), run / f"{name}.safetensors")
    assert {"text_encoder", "text_encoder_2"} <= {p.stem for p in run.glob("*.safetensors")}
    return model, run


@torch.no_grad()
def encode(encoder) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 70, (2, 9), generator=torch.Generator().manual_seed(0))
    out = encoder(ids)
    return {"last_hidden_state": out.last_hidden_state, "text_embeds": out.text_embeds}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_export_text_encoder_2_loads_into_the_second_encoder(sd3_run, tmp_path, capsys):
    from diffusers import StableDiffusion3Pipeline

    from tsm.recipes.run import load_run

    model, run = sd3_run
    out = tmp_path / "te2.safetensors"
    code = main(
        ["export", str(run), "--module", "text_encoder_2", "--scale", "0", "--index", "1", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err

    ours = load_run(run)[1].text_encoders["text_encoder_2"]
    tsm.set_timesteps(ours, T_EXPERT_1)
    expected = encode(ours.eval())

    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    first_before, second_before = encode(pipe.text_encoder), encode(pipe.text_encoder_2)
    assert max_diff(second_before, expected) > 1e-3  # the expert changes the encoder: the test can fail

    pipe.load_lora_weights(out)

    second, first = encode(pipe.text_encoder_2), encode(pipe.text_encoder)
    diffs = {"second vs ours": max_diff(second, expected), "first vs base": max_diff(first, first_before)}
    print(f"max differences: {diffs}")
    for k in expected:
        torch.testing.assert_close(second[k], expected[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(first[k], first_before[k], rtol=0, atol=0)
    keys = list(load_file(out))
    assert keys and all(k.startswith("text_encoder_2.") for k in keys), keys[:3]


def test_export_all_and_steps_use_the_component_name(sd3_run, tmp_path, capsys):
    _, run = sd3_run
    for extra in (["--all"], ["--timesteps", "100", str(T_EXPERT_1)]):
        out = tmp_path / extra[0].strip("-")
        code = main(["export", str(run), "--module", "text_encoder_2", *extra, "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        files = sorted(out.glob("*.safetensors"))
        assert len(files) == (3 if extra == ["--all"] else 2)
        for f in files:
            assert all(k.startswith("text_encoder_2.") for k in load_file(f)), f.name


def test_default_prefix_knows_the_folder_or_refuses_to_guess(sd3_run, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    model, _ = sd3_run
    pipe = StableDiffusion3Pipeline.from_pretrained(model)  # each part read from its own folder
    parts = ("transformer", "text_encoder_2", "text_encoder_3")
    assert [tsm.io.default_prefix(getattr(pipe, n)) for n in parts] == list(parts)
    spec = tsm.ExpertSpec(scales=(1,), rank=2, alpha=2, targets=["q_proj"])
    te2 = randomize_experts(tsm.add_experts(pipe.text_encoder_2, spec))
    keys = load_file(tsm.export_lora(te2, tmp_path / "a.safetensors"))
    assert all(k.startswith("text_encoder_2.") for k in keys)
    keys = load_file(tsm.export_lora(te2, tmp_path / "b.safetensors", prefix="text_encoder"))  # explicit wins
    assert all(k.startswith("text_encoder.") for k in keys)

    # read with subfolder=: the root holds two CLIPTextModelWithProjection folders, so no guess
    sub = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    with pytest.raises(tsm.TsmError, match="pass prefix="):
        tsm.io.default_prefix(sub)
    t5 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3")  # the one T5 of the folder
    assert tsm.io.default_prefix(t5) == "text_encoder_3"

    # built in Python: nothing to go by but the class; a LoRA with keys of both encoders is then refused
    bare = tsm.add_experts(tiny_clip_text_with_projection(1), spec)
    assert tsm.io.default_prefix(bare) == "text_encoder"
    both = {**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")}
    with pytest.raises(tsm.TsmError, match="text_encoder, text_encoder_2"):
        tsm.import_lora(bare, both)
    summary = tsm.import_lora(bare, both, prefix="text_encoder_2")
    assert summary["missing"] == []
