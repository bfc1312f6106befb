"""Tiny random diffusers / transformers models and pipelines for tests (no hub downloads).

Plain functions, so any test can ``from conftest import tiny_unet2d``. Every factory seeds torch itself:
two calls give identical weights.
"""

import atexit
import os
import shutil
import tempfile

import torch

import tsm

# Tiny models: one thread is faster than several (no OpenMP spin-waits, no fighting other processes).
torch.set_num_threads(1)

# tsm's user cache (the data check's verdicts) goes to a folder of this test session, never ~/.cache;
# subprocess runs inherit it through the environment
os.environ["TSM_CACHE"] = tempfile.mkdtemp(prefix="tsm_cache_")
atexit.register(shutil.rmtree, os.environ["TSM_CACHE"], ignore_errors=True)

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def _seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def randomize_experts(model, std: float = 0.02, seed: int = 1):
    """Make every expert's B non-zero (B starts at zero, so tests that must be able to fail need this)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in tsm.expert_layers(model):
            for p in layer.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------------------
# denoisers
# ------------------------------------------------------------------------------------------------
_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)


def tiny_unet2d():
    from diffusers import UNet2DConditionModel

    _seeded()
    return UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **_UNET,
    )


def tiny_unet3d():
    from diffusers import UNet3DConditionModel

    _seeded()
    return UNet3DConditionModel(
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        **_UNET,
    )


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    _seeded()
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    _seeded()
    # 2 layers: the last one has no to_add_out (context_pre_only). joint_attention_dim is the T5 width, which
    # must hold the two CLIP widths side by side (32 + 32), as 4096 >= 768 + 1280 in SD3.
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )


def tiny_wan():
    from tiny_models import tiny_wan_transformer

    return tiny_wan_transformer(seed=0)  # torch.manual_seed(0), as _seeded()


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    _seeded()
    # FLUX.1-dev-like: one double-stream and one single-stream block and a guidance embedding. Tokens are
    # 2x2 patches of 4 latent channels (16 features); joint_attention_dim is the T5 width, pooled the CLIP one.
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )


def tiny_qwen_transformer():
    from diffusers import QwenImageTransformer2DModel

    _seeded()
    # 2x2 patches of 4 latent channels in, 4 channels per pixel out; joint_attention_dim: the Qwen2.5-VL width
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )


def tiny_vae(latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    _seeded()
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=16,
        **config,
    )


def tiny_flux_vae():
    """As FLUX.1's VAE: a shift factor besides the scaling factor, no quant convs (x2 downsampling here)."""
    return tiny_vae(
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False
    )


def tiny_qwen_vae():
    """Qwen-Image's causal video VAE (x4 spatial downsampling here), with per-channel latent statistics."""
    from diffusers import AutoencoderKLQwenImage

    _seeded()
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )


# ------------------------------------------------------------------------------------------------
# text encoders
# ------------------------------------------------------------------------------------------------
def _clip_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def tiny_clip_text(seed: int = 0):
    from transformers import CLIPTextModel

    _seeded(seed)
    return CLIPTextModel(_clip_config()).eval()


def tiny_clip_text_with_projection(seed: int = 0):
    from transformers import CLIPTextModelWithProjection

    _seeded(seed)
    return CLIPTextModelWithProjection(_clip_config()).eval()


def tiny_t5(seed: int = 0, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    _seeded(seed)
    config = T5Config(vocab_size=1000, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval()


def tiny_qwen_text(seed: int = 0, vocab_size: int = 400):
    """A Qwen2.5-VL text encoder (with its tiny vision tower, unused); token ids below ``vocab_size``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _seeded(seed)
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=0)  # <|endoftext|>, <|im_end|> in qwen_tokenizer
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab_size,
            **ids,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        vocab_size=vocab_size,
        # the vision tokens: the last ids, which the tokenizer never produces
        vision_start_token_id=vocab_size - 4,
        vision_end_token_id=vocab_size - 3,
        image_token_id=vocab_size - 2,
        video_token_id=vocab_size - 1,
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


# ------------------------------------------------------------------------------------------------
# pipelines: built without tokenizers, called with precomputed embeddings
# ------------------------------------------------------------------------------------------------
def _eval(pipe):
    """Put every model of a pipeline in eval mode, as from_pretrained does (constructors give train mode)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _embeds(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tiny_sd_pipeline():
    """StableDiffusionPipeline on tiny parts, and the prompt kwargs its __call__ needs (no tokenizer)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = _eval(
        StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=tiny_clip_text(),
            tokenizer=None,
            unet=tiny_unet2d(),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    )
    prompt = {"prompt_embeds": _embeds((1, 7, 32), 10), "negative_prompt_embeds": _embeds((1, 7, 32), 11)}
    return pipe, prompt


def tiny_pixart_pipeline():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    pipe = _eval(
        PixArtAlphaPipeline(
            tokenizer=None,
            text_encoder=tiny_t5(),
            vae=tiny_vae(),
            transformer=tiny_pixart(),
            scheduler=DPMSolverMultistepScheduler(),
        )
    )
    mask = torch.ones(1, 6, dtype=torch.long)
    prompt = {
        "prompt_embeds": _embeds((1, 6, 32), 10),
        "prompt_attention_mask": mask,
        "negative_prompt": None,  # its default "" clashes with negative_prompt_embeds
        "negative_prompt_embeds": _embeds((1, 6, 32), 11),
        "negative_prompt_attention_mask": mask,
        "use_resolution_binning": False,
    }
    return pipe, prompt


def tiny_sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = _eval(
        StableDiffusion3Pipeline(
            transformer=tiny_sd3(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae(latent_channels=4),
            text_encoder=tiny_clip_text_with_projection(0),
            tokenizer=None,
            text_encoder_2=tiny_clip_text_with_projection(1),
            tokenizer_2=None,
            text_encoder_3=tiny_t5(d_model=64),
            tokenizer_3=None,
        )
    )
    prompt = {
        "prompt_embeds": _embeds((1, 9, 64), 10),
        "negative_prompt_embeds": _embeds((1, 9, 64), 11),
        "pooled_prompt_embeds": _embeds((1, 64), 12),
        "negative_pooled_prompt_embeds": _embeds((1, 64), 13),
    }
    return pipe, prompt
