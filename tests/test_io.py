"""Checkpoints (save/load) and experts as diffusers LoRA files (export/import), on tiny fixed-seed models."""

import copy

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

import tsm
from tsm import ExpertSpec, TsmError
from tsm.inject import expert_layers

UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    sample_size=8,
    norm_num_groups=8,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
SPEC = dict(scales=(4, 1), rank=4, alpha=8)  # scaling 2: a baked or forgotten alpha shows


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET, **overrides}).eval()


def randomize(model, seed: int, routers: bool = False) -> None:
    """Non-zero B (and router) weights, so that a lost or misplaced expert changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in expert_layers(model):
            params = list(layer.lora_B.values())
            if routers and layer.router is not None:
                params += list(layer.router.parameters())
            for p in params:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def with_experts(model, seed: int = 1, stage: str = "foster", **spec):
    torch.manual_seed(seed)  # the A init
    tsm.add_experts(model, ExpertSpec(**{**SPEC, **spec}), stage=stage)
    randomize(model, seed, routers=stage == "assemble")
    return model.eval()  # eval + no_grad: expert layers merge the core expert, as when sampling


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 7, 32, generator=g)


@torch.no_grad()
def denoise(unet, t) -> torch.Tensor:
    x, text = inputs()
    return unet(x, t, encoder_hidden_states=text).sample


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(TsmError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["foster", "assemble"])
def test_save_load_roundtrip(tmp_path, stage):
    source = with_experts(tiny_unet(), stage=stage)
    path = tsm.save(source, tmp_path / "experts.safetensors")
    target = with_experts(tiny_unet(), seed=7, stage=stage)
    mixed = torch.tensor([100, 800])  # two experts in one batch
    assert not torch.equal(denoise(target, mixed), denoise(source, mixed))
    denoise(target, 600)  # merges expert s0_i2 into the base weights: load must unmerge it

    metadata = tsm.load(target, path)

    assert metadata["tsm_stage"] == stage and metadata["tsm_format"] == "1"
    assert tsm.read_spec(path) == tsm.get_routing(source).spec
    for t in (600, mixed):
        torch.testing.assert_close(denoise(target, t), denoise(source, t), rtol=0, atol=0)
    if stage == "assemble":  # routers are saved too, and they matter in this stage
        assert any(k.endswith("router.table") for k in tsm.io.expert_state(target))


def test_saved_names_are_relative_to_the_model(tmp_path):
    path = tsm.save(with_experts(tiny_unet()), tmp_path / "experts.safetensors")
    tensors = load_file(path)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.s0_i3" in tensors
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.router.proj" in tensors
    assert not any("base_layer" in k for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_atomic_save_leaves_no_temp_files(tmp_path, monkeypatch):
    model = with_experts(tiny_unet())
    path = tsm.save(model, tmp_path / "experts.safetensors")
    tsm.save(model, path)  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["experts.safetensors"]
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tsm.io, "save_file", crash)
    with pytest.raises(OSError):
        tsm.save(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["experts.safetensors"]
    assert path.read_bytes() == before  # the old checkpoint survives a failed save


@pytest.fixture
def saved(tmp_path):
    return tsm.save(with_experts(tiny_unet()), tmp_path / "experts.safetensors")


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(rank=8), "rank 4 != 8"),
        (dict(scales=(8, 1)), "scales [4, 1] != [8, 1]"),
        (dict(targets=["to_q", "to_k"]), "targets"),
        (dict(alpha=4), "alpha 8 != 4"),
    ],
)
def test_load_rejects_another_spec(saved, change, expected):
    message = error_of(tsm.load, with_experts(tiny_unet(), **change), saved)
    assert expected in message and "read_spec" in message


def test_load_rejects_another_model(saved):
    message = error_of(tsm.load, with_experts(tiny_unet(layers_per_block=2)), saved)
    assert "missing" in message and "down_blocks.0.attentions.1" in message
    message = error_of(tsm.load, with_experts(tiny_unet(cross_attention_dim=16)), saved)
    assert "shapes differ" in message and "attn2.to_k.lora_A" in message and "(4, 32) != (4, 16)" in message


def test_load_rejects_bad_files(saved, tmp_path):
    model = with_experts(tiny_unet())
    data = saved.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(bytes(range(256)) * 16)
    save_file({"weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    for name, expected in [
        ("half", "truncated"),
        ("garbage", "cannot read"),
        ("missing", "does not exist"),
        ("plain", "not a tsm checkpoint"),
    ]:
        assert expected in error_of(tsm.load, model, tmp_path / f"{name}.safetensors")
    assert "import_lora" in error_of(tsm.load, model, tmp_path / "plain.safetensors")
    assert "does not exist" in error_of(tsm.read_metadata, tmp_path / "missing.safetensors")
    assert "is a directory" in error_of(tsm.load, model, tmp_path)


# ----------------------------------------------------------------------------------------------------
# export: one expert as a diffusers LoRA
# ----------------------------------------------------------------------------------------------------
def tiny_pipeline(unet) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline of tiny random parts; no tokenizer: it is called with prompt embeddings."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            projection_dim=32,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_exported_expert_is_the_same_model_in_diffusers(tmp_path):
    base = tiny_unet()
    model = with_experts(copy.deepcopy(base))
    path = tsm.export_lora(model, tmp_path / "expert.safetensors", scale=0, index=2)
    pipe = tiny_pipeline(copy.deepcopy(base))

    pipe.load_lora_weights(path)

    t = 600  # in [500, 750): expert 2 of 4 at the finest scale
    torch.testing.assert_close(denoise(pipe.unet, t), denoise(model, t), rtol=0, atol=1e-5)
    assert not torch.allclose(denoise(pipe.unet, 100), denoise(model, 100), atol=1e-3)  # another expert
    assert not torch.allclose(denoise(pipe.unet, t), denoise(base, t), atol=1e-3)


def test_single_expert_pipeline_equals_plain_lora(tmp_path):
    base = tiny_unet()
    model = with_experts(copy.deepcopy(base), scales=(1,))
    path = tsm.export_lora(model, tmp_path / "lora.safetensors")
    with_lora = tiny_pipeline(copy.deepcopy(base))
    with_lora.load_lora_weights(path)
    g = torch.Generator().manual_seed(0)
    call = dict(
        prompt_embeds=torch.randn(1, 7, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
        latents=torch.randn(1, 4, 8, 8, generator=g),
        height=8,
        width=8,
        num_inference_steps=3,
        output_type="np",
    )

    ours = tiny_pipeline(model)(**call).images
    theirs = with_lora(**call).images
    plain = tiny_pipeline(base)(**call).images

    assert ours.shape == (1, 8, 8, 3)
    torch.testing.assert_close(torch.from_numpy(theirs), torch.from_numpy(ours), rtol=0, atol=1e-4)
    assert abs(ours - plain).max() > 1e-3


def test_exported_conv_expert_loads_in_diffusers(tmp_path):
    base = tiny_unet()
    model = with_experts(copy.deepcopy(base), targets=["conv1", "conv2"])
    path = tsm.export_lora(model, tmp_path / "conv.safetensors", scale=0, index=1)
    unet = copy.deepcopy(base)

    unet.load_lora_adapter(path, prefix="unet")

    conv1 = unet.down_blocks[0].resnets[0].conv1
    assert type(conv1).__module__.startswith("peft") and conv1.lora_B["default_0"].kernel_size == (1, 1)
    t = 300  # in [250, 500): expert 1 of 4
    torch.testing.assert_close(denoise(unet, t), denoise(model, t), rtol=0, atol=1e-5)
    assert not torch.allclose(denoise(unet, t), denoise(base, t), atol=1e-3)


def test_exported_text_encoder_expert_loads_in_diffusers(tmp_path):
    base = tiny_pipeline(tiny_unet()).text_encoder
    model = with_experts(copy.deepcopy(base), scales=(2, 1), targets=["q_proj", "v_proj"])
    path = tsm.export_lora(model, tmp_path / "te.safetensors", scale=0, index=1)
    pipe = tiny_pipeline(tiny_unet())
    pipe.text_encoder = copy.deepcopy(base)

    pipe.load_lora_weights(path)  # prefix text_encoder: the pipeline routes it to its text encoder

    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    tsm.set_timesteps(model, 700)  # expert 1 of 2
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, expected, rtol=0, atol=1e-5)


def test_export_keys_and_errors(tmp_path):
    model = with_experts(tiny_unet())
    path = tsm.export_lora(model, tmp_path / "e.safetensors", scale=1, index=0)
    metadata = tsm.read_metadata(path)
    assert metadata["format"] == "pt" and '"scale": 1' in metadata["tsm_expert"]
    assert tsm.read_spec(path) == tsm.get_routing(model).spec
    assert "import_lora" in error_of(tsm.load, model, path)
    bare = tsm.export_lora(model, tmp_path / "bare.safetensors", prefix="")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in load_file(path)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight" in load_file(bare)
    assert "scale must be" in error_of(tsm.export_lora, model, tmp_path / "x", scale=2)
    assert "index must be in [0, 4)" in error_of(tsm.export_lora, model, tmp_path / "x", scale=0, index=4)
    assert "index must be in [0, 1)" in error_of(tsm.export_lora, model, tmp_path / "x", scale=1, index=1)

    dilated = with_experts(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, dilation=2)), targets=["0"])
    assert "dilated conv" in error_of(tsm.export_lora, dilated, tmp_path / "x")

    paths = tsm.export_all_lora(model, tmp_path / "all")
    assert [p.name for p in paths] == [f"expert_s0_i{i}.safetensors" for i in range(4)] + [
        "expert_s1_i0.safetensors"
    ]


# ----------------------------------------------------------------------------------------------------
# import: experts from an existing LoRA
# ----------------------------------------------------------------------------------------------------
def deltas(model, expert: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: layer.delta_weight(expert) for name, layer in expert_layers(model)}


def test_import_exported_expert_roundtrip(tmp_path):
    source = with_experts(tiny_unet())
    path = tsm.export_lora(source, tmp_path / "e.safetensors", scale=0, index=2)
    expected = deltas(source, 2)  # global id of s0_i2

    everywhere = with_experts(tiny_unet(), seed=3)
    denoise(everywhere, 600)  # merges expert s0_i2: import must unmerge it
    summary = tsm.import_lora(everywhere, path)
    assert summary["missing"] == [] and summary["loaded"] == sorted(expected)
    torch.testing.assert_close(denoise(everywhere, 600), denoise(source, 600), rtol=0, atol=0)
    for expert in range(5):
        for name, delta in deltas(everywhere, expert).items():
            torch.testing.assert_close(delta, expected[name], rtol=0, atol=0)

    one = with_experts(tiny_unet(), seed=3)
    before = deltas(one, 4)
    tsm.import_lora(one, path, scale=0, index=1)
    for name, delta in deltas(one, 1).items():
        torch.testing.assert_close(delta, expected[name], rtol=0, atol=0)
    for name, delta in deltas(one, 4).items():  # the other experts are untouched
        torch.testing.assert_close(delta, before[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "naming",
    [
        "unet.{}.lora_A.weight",  # diffusers
        "{}.lora_down.weight",  # kohya-style names
        "base_model.model.{}.lora_A.weight",  # PEFT's PeftModel
    ],
)
def test_import_rescales_alpha(naming):
    model = with_experts(tiny_unet())  # rank 4, alpha 8: s = 2
    g = torch.Generator().manual_seed(0)
    covered = {name: layer for name, layer in expert_layers(model) if name.endswith("attn1.to_q")}
    lora, expected = {}, {}
    for name, layer in covered.items():
        a = torch.randn(4, layer.base_layer.in_features, generator=g)
        b = torch.randn(layer.base_layer.out_features, 4, generator=g)
        lora[naming.format(name)] = a
        lora[naming.replace("lora_A", "lora_B").replace("lora_down", "lora_up").format(name)] = b
        lora[naming.split("{}")[0] + name + ".alpha"] = torch.tensor(2.0)  # source scale 2 / 4
        expected[name] = 0.5 * b @ a
    before = deltas(model, 0)

    summary = tsm.import_lora(model, lora)

    assert summary["loaded"] == sorted(covered) and len(summary["missing"]) == len(before) - len(covered)
    for name, delta in deltas(model, 0).items():
        torch.testing.assert_close(delta, expected.get(name, before[name]), rtol=1e-6, atol=1e-6)


def test_import_errors(tmp_path):
    model = with_experts(tiny_unet())
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = {f"{name}.lora_A.weight": torch.zeros(8, 32), f"{name}.lora_B.weight": torch.zeros(32, 8)}
    assert "LoRA rank 8 != the experts' rank 4" in error_of(tsm.import_lora, model, lora)
    other = {"unet.mid_block.nothing.lora_A.weight": torch.zeros(4, 32)}
    assert "match no expert layer" in error_of(tsm.import_lora, model, other)
    text_only = {"text_encoder.q_proj.lora_A.weight": torch.zeros(4, 32)}
    assert "none with prefix 'unet'" in error_of(tsm.import_lora, model, text_only)
    assert "unsupported LoRA key" in error_of(tsm.import_lora, model, {f"{name}.lora_B.bias": torch.zeros(4)})
    assert "index needs a scale" in error_of(tsm.import_lora, model, lora, index=1)
    assert "does not exist" in error_of(tsm.import_lora, model, tmp_path / "nope.safetensors")
