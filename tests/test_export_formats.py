"""Experts as kohya LoRA files (loaded by diffusers' own kohya loader, read back by import_lora), and per-step
expert switching in an unmodified diffusers pipeline through `tsm.io.expert_switch_callback`."""

import copy

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_io import denoise, error_of, inputs, tiny_pipeline, tiny_unet, with_experts

import tsm
from tsm import comfyui
from tsm.io import expert_switch_callback

T_EXPERT_2 = 600  # in [500, 750): expert 2 of 4 at the finest scale


def kohya_file(model, tmp_path, index: int = 2, **kw):
    src = tsm.export_lora(model, tmp_path / "diffusers.safetensors", scale=0, index=index)
    return comfyui.convert_file(src, tmp_path / "kohya.safetensors", "kohya", **kw)


def test_kohya_export_loads_in_diffusers_as_the_expert(tmp_path):
    base = tiny_unet()
    model = with_experts(copy.deepcopy(base), targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    path = kohya_file(model, tmp_path)
    keys = list(load_file(path))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in keys
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4" and "tsm_expert" in meta

    pipe = tiny_pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(path)  # diffusers detects lora_unet_ keys and converts them itself

    ours = denoise(model, T_EXPERT_2)
    torch.testing.assert_close(denoise(pipe.unet, T_EXPERT_2), ours, rtol=0, atol=1e-5)
    assert (denoise(pipe.unet, T_EXPERT_2) - denoise(base, T_EXPERT_2)).abs().max() > 1e-3
    assert (denoise(pipe.unet, 100) - denoise(model, 100)).abs().max() > 1e-3  # another expert there


def test_kohya_import_warm_starts_experts(tmp_path):
    source = with_experts(tiny_unet(), targets=["to_q", "to_v", "conv1"])
    path = kohya_file(source, tmp_path)
    fresh = with_experts(tiny_unet(), seed=5, targets=["to_q", "to_v", "conv1"])
    assert (denoise(fresh, T_EXPERT_2) - denoise(source, T_EXPERT_2)).abs().max() > 1e-3

    summary = tsm.import_lora(fresh, path)

    assert summary["missing"] == []
    torch.testing.assert_close(denoise(fresh, T_EXPERT_2), denoise(source, T_EXPERT_2), rtol=0, atol=1e-5)
    layers = dict(tsm.expert_layers(source))
    with torch.no_grad():
        for name, layer in tsm.expert_layers(
            fresh
        ):  # every expert (5: 4 + 1) now holds the source's expert 2
            for expert in range(5):
                torch.testing.assert_close(
                    layer.delta_weight(expert), layers[name].delta_weight(2), rtol=1e-6, atol=1e-6
                )


def test_kohya_alpha_and_text_encoder_names(tmp_path):
    te = tiny_pipeline(tiny_unet()).text_encoder
    model = with_experts(copy.deepcopy(te), scales=(2, 1), targets=["q_proj", "v_proj", "fc1"])
    src = tsm.export_lora(model, tmp_path / "te.safetensors", scale=0, index=1)
    one = load_file(comfyui.convert_file(src, tmp_path / "one.safetensors", "kohya", text_encoders=1))
    two = load_file(comfyui.convert_file(src, tmp_path / "two.safetensors", "kohya", text_encoders=2))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in one
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in two

    # a kohya alpha != rank: import folds alpha / r into B (here 2 / 4 = 0.5)
    halved = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v) for k, v in one.items()}
    target = with_experts(copy.deepcopy(te), seed=3, scales=(2, 1), targets=["q_proj", "v_proj", "fc1"])
    tsm.import_lora(target, halved, scale=0, index=1)
    tsm.import_lora(model, src, scale=0, index=0)  # the same expert in both intervals of the source
    for name, layer in tsm.expert_layers(target):
        theirs = dict(tsm.expert_layers(model))[name]
        torch.testing.assert_close(layer.delta_weight(1), 0.5 * theirs.delta_weight(1), rtol=1e-6, atol=1e-6)


def test_switch_callback_samples_as_tsm(tmp_path):
    base = tiny_unet()
    model = with_experts(copy.deepcopy(base), scales=(4,))
    paths = tsm.export_all_lora(model, tmp_path)
    pipe = tiny_pipeline(copy.deepcopy(base))
    names = [f"expert{i}" for i in range(4)]
    for path, name in zip(paths, names, strict=True):
        pipe.load_lora_weights(path, adapter_name=name)
    _, text = inputs(1)
    g = torch.Generator().manual_seed(0)
    call = dict(
        prompt_embeds=text,
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        latents=torch.randn(1, 4, 8, 8, generator=g),
        height=8,
        width=8,
        num_inference_steps=6,  # DDIM: t = 833 .. 0, two steps or fewer per expert
        output_type="np",
    )
    spec = tsm.get_routing(model).spec

    ours = tiny_pipeline(model)(**call).images  # tsm routes the experts from the timestep itself
    callback = expert_switch_callback(pipe, names, spec, num_inference_steps=6)
    switched = pipe(**call, callback_on_step_end=callback).images
    fixed = pipe(**call).images  # the last adapter set stays on for every step

    diff = abs(switched - ours).max()
    print(f"max |switched - tsm| = {diff:.2e}, |fixed - tsm| = {abs(fixed - ours).max():.2e}")
    assert diff < 1e-4
    assert abs(fixed - ours).max() > 1e-3


def test_one_file_of_several_parts_needs_the_same_intervals(tmp_path):
    a = with_experts(tiny_unet(), scales=(4, 1))
    b = with_experts(tiny_unet(seed=1), scales=(2, 1))
    assert "cut the timesteps otherwise" in error_of(tsm.export_lora, {"unet": a, "other": b}, tmp_path / "x")
    assert "vae has no experts" in error_of(tsm.export_lora, {"unet": a, "vae": tiny_unet()}, tmp_path / "x")
    assert "names one model" in error_of(tsm.export_lora, {"unet": a}, tmp_path / "x", prefix="unet")
    both = load_file(
        tsm.export_lora({"unet": a, "text_encoder": with_experts(tiny_unet(seed=2))}, tmp_path / "y")
    )
    assert {k.split(".")[0] for k in both} == {"unet", "text_encoder"}
    assert not (tmp_path / "x").exists()
