"""Experts in the formats other tools load: kohya LoRA files, ComfyUI LoRA files, and a ComfyUI workflow that
switches expert by sampling step.

Every conversion starts from the diffusers/PEFT file `tsm.io.export_lora` writes (``unet.{module}.lora_A.weight``,
alpha baked into B) and renames keys with diffusers' own converter (``convert_state_dict_to_kohya``).

Which format ComfyUI gets, per family -- checked against ComfyUI's key map (``comfy/lora.py``:
``model_lora_keys_unet`` / ``model_lora_keys_clip``; ``comfy/lora_convert.py`` converts nothing for these):

    sd15/sdxl kohya (``lora_unet_{diffusers name, . -> _}``): ComfyUI maps UNet keys through
              ``unet_to_diffusers``; the PEFT names ``unet.{module}.lora_A`` are not in its UNet map
    sd3, flux diffusers (``transformer.{module}.lora_A.weight``): ComfyUI's ``mmdit_to_diffusers`` /
              ``flux_to_diffusers`` map diffusers names; kohya's names for these models are the original
              (MMDiT / BFL) ones, not diffusers', so a kohya rename would not be found
    wan       Wan's original names with ComfyUI's ``diffusion_model.`` prefix
              (``diffusion_model.blocks.0.self_attn.q.lora_A.weight``): the model's own state-dict keys, which
              ComfyUI's key map takes as they are; the layout ai-toolkit writes for Wan 2.1 / 2.2, and one
              diffusers' ``WanPipeline.load_lora_weights`` converts back (tested)
    CLIP text kohya (``lora_te_`` for one text encoder, ``lora_te1_`` / ``lora_te2_`` for two), the
    encoders names ``model_lora_keys_clip`` maps for clip_l / clip_g (q/k/v/out_proj, fc1, fc2)

The workflow (`workflow`) is ComfyUI's API JSON: one ``CreateHookLora`` per finest-scale interval that a sampling
call falls in, scheduled by ``CreateHookKeyframe`` / ``SetHookKeyframes``, combined with ``CombineHooks2`` and
attached to both the positive and negative conditioning by ``PairConditioningSetProperties``. The keyframes are
placed from the schedule KSampler will run (``calculate_sigmas`` in comfy/samplers.py, ComfyUI's sigma tables in
comfy/model_sampling.py): each call's timestep picks its interval, and a LoRA switches only between two calls, so
ComfyUI's keyframe rule (comfy/hooks.py, each keyframe held at least one call) never runs two experts in one call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tsm import io
from tsm.errors import TsmError
from tsm.inject import get_routing
from tsm.intervals import Scale, expert_index, interval_bounds

PathLike = io.PathLike
FORMATS = ("diffusers", "kohya", "comfyui")
COMFYUI_DENOISER = {
    "sd15": "kohya",
    "sdxl": "kohya",
    "sd3": "diffusers",
    "flux": "diffusers",
    "wan": "wan",
}  # per family, see the docstring
COMFYUI_TEXT = {
    "sd15": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2"),
    "flux": ("text_encoder",),
    "wan": (),
}
# Wan's original module names (what ComfyUI's Wan model and musubi-tuner / ai-toolkit files use) for diffusers'
# WanTransformer3DModel names inside blocks.N: diffusers' own table (_convert_non_diffusers_wan_lora_to_diffusers)
WAN_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
KOHYA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_TEXT_FAMILIES = ("sd15", "sdxl")  # the families whose text encoders kohya / A1111 names (lora_te_...)
# transformers >= 5 dropped CLIPTextModel's ``text_model.`` level; kohya (and ComfyUI's map) keep it
CLIP_TOP = ("encoder.", "embeddings.", "final_layer_norm.")


# ----------------------------------------------------------------------------------------------------
# kohya / ComfyUI LoRA files
# ----------------------------------------------------------------------------------------------------
def _rank(tensors: Mapping[str, torch.Tensor]) -> int:
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight"))}
    return max(ranks) if ranks else 0


def to_kohya(tensors: Mapping[str, torch.Tensor], text_encoders: int = 1) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT LoRA (``unet.`` / ``text_encoder*.`` keys, alpha baked in) in kohya's names.

    ``lora_unet_…`` / ``lora_te_…`` (``lora_te1_``/``lora_te2_`` when the model has ``text_encoders`` = 2 or
    more) with ``.lora_down/.lora_up.weight`` and ``.alpha`` = rank (scale 1: B already holds alpha / r).
    """
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_kohya

    if not tensors:
        return {}
    components = {k.split(".", 1)[0] for k in tensors}
    other = components - set(KOHYA_COMPONENTS)
    if other:
        raise TsmError(
            f"kohya names cover UNet and CLIP text encoders ({', '.join(KOHYA_COMPONENTS)}), not "
            f"{', '.join(sorted(other))}; export --format diffusers (or comfyui) for this model"
        )
    peft = {}
    for k, v in tensors.items():
        head, rest = k.split(".", 1)
        if head.startswith("text_encoder") and rest.startswith(CLIP_TOP):
            rest = "text_model." + rest
        peft[f"{head}.{rest}"] = v
    out = {}
    for k, v in convert_state_dict_to_kohya(peft, StateDictType.PEFT).items():
        if k.endswith(".alpha"):
            v = torch.tensor(float(v))  # kohya writes a float alpha; diffusers' converter an int
        if text_encoders < 2 and k.startswith("lora_te1_"):
            k = "lora_te_" + k.removeprefix("lora_te1_")  # SD1.x: one text encoder, kohya's lora_te_
        out[k] = v
    return out


def kohya_metadata(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """The ``ss_*`` metadata kohya's sd-scripts write that applies here, and the tsm metadata kept."""
    rank = _rank(tensors)
    ss = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    return {**{k: v for k, v in metadata.items() if k.startswith("tsm_")}, **ss}


def to_comfyui(
    tensors: Mapping[str, torch.Tensor], family: str, text_encoders: int = 1
) -> dict[str, torch.Tensor]:
    """The LoRA in the names ComfyUI's loader maps for ``family`` (the table in the module docstring)."""
    if family not in COMFYUI_DENOISER:
        raise TsmError(
            f"ComfyUI's LoRA key map (comfy/lora.py) has no diffusers names for the {family} family; "
            f"ComfyUI export covers {', '.join(COMFYUI_DENOISER)} (use --format diffusers)"
        )
    denoiser, texts = {}, {}
    for k, v in tensors.items():
        head = k.split(".", 1)[0]
        if head in ("unet", "transformer"):
            denoiser[k] = v
        elif head in COMFYUI_TEXT[family]:
            texts[k] = v
        else:
            raise TsmError(
                f"ComfyUI maps LoRA keys of {family}'s {', '.join(COMFYUI_TEXT[family])} text encoder(s) "
                f"only, not {head}; export that module with --format diffusers"
            )
    out = to_kohya(texts, text_encoders) if texts else {}
    kind = COMFYUI_DENOISER[family]
    out.update(to_kohya(denoiser) if kind == "kohya" else to_wan(denoiser) if kind == "wan" else denoiser)
    return out


def to_wan(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Wan LoRA in diffusers names (``transformer.blocks.N.attn1.to_q.lora_A.weight``) in Wan's original ones
    (``diffusion_model.blocks.N.self_attn.q.lora_A.weight``; `WAN_NAMES`), alpha still baked into B."""
    out = {}
    for key, value in tensors.items():
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        block, _, inner = module.partition(".") if module.startswith("blocks.") else ("", "", module)
        number, _, layer = inner.partition(".")
        if not block or layer not in WAN_NAMES:
            raise TsmError(
                f"Wan's original names cover the blocks' attention and FFN layers, not {module}; export with "
                "--format diffusers, or train without it in experts.targets"
            )
        out[f"diffusion_model.blocks.{number}.{WAN_NAMES[layer]}.lora_{suffix}"] = value
    return out


def text_parts(fmt: str, family: str) -> tuple[str, ...]:
    """The text-encoder components whose experts ``fmt`` can name for ``family`` (the others are left out)."""
    if fmt == "kohya":  # A1111 / Forge / kohya read lora_te_ (SD1.x) and lora_te1_ / lora_te2_ (SDXL) CLIPs
        return ("text_encoder", "text_encoder_2") if family in KOHYA_TEXT_FAMILIES else ()
    if fmt == "comfyui":
        return COMFYUI_TEXT.get(family, ())
    return ("text_encoder", "text_encoder_2", "text_encoder_3")


def convert(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    fmt: str,
    family: str = "",
    text_encoders: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers-format LoRA (tensors, metadata) as tsm writes it, renamed for ``fmt``."""
    if fmt not in FORMATS:
        raise TsmError(f"unknown LoRA format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "diffusers":
        return dict(tensors), dict(metadata)
    if fmt == "kohya":
        return to_kohya(tensors, text_encoders), kohya_metadata(tensors, metadata)
    out = to_comfyui(tensors, family, text_encoders)
    kohya_names = any(k.startswith("lora_") for k in out)
    return out, kohya_metadata(tensors, metadata) if kohya_names else dict(metadata)


def save_as(
    state: tuple[Mapping[str, torch.Tensor], Mapping[str, str]],
    path: PathLike,
    fmt: str,
    family: str = "",
    text_encoders: int = 1,
) -> Path:
    """Write ``state`` (`tsm.io.lora_state` / `step_lora_state`) as a ``fmt`` LoRA file; nothing is written
    when the renaming fails."""
    tensors, metadata = convert(*state, fmt, family, text_encoders)
    return io._atomic_save(tensors, path, metadata)


def convert_file(src: PathLike, dst: PathLike, fmt: str, family: str = "", text_encoders: int = 1) -> Path:
    """Rewrite a diffusers-format LoRA file written by tsm as ``fmt`` (diffusers, kohya or comfyui)."""
    metadata, tensors = io._open(src, read_tensors=True)
    return save_as((tensors, metadata), dst, fmt, family, text_encoders)


# ----------------------------------------------------------------------------------------------------
# ComfyUI's sampling schedule: sigma tables, schedulers, the model's timestep, percent <-> sigma
# ----------------------------------------------------------------------------------------------------
def sampling_of(family: str, scheduler_config: Mapping, width: int, height: int) -> dict[str, float | str]:
    """How ComfyUI samples the family: ``discrete`` (eps / v), ``flow`` (SD3: shift) or ``flux`` (mu)."""
    if family in ("sd15", "sdxl"):
        if int(scheduler_config.get("num_train_timesteps", 1000)) != 1000:
            raise TsmError("ComfyUI's discrete models have 1000 timesteps; this scheduler has another count")
        return {"kind": "discrete"}
    if family == "sd3":
        return {"kind": "flow", "shift": float(scheduler_config.get("shift", 1.0))}
    if family == "flux":
        max_shift = float(scheduler_config.get("max_shift", 1.15))
        base_shift = float(scheduler_config.get("base_shift", 0.5))
        # ModelSamplingFlux (comfy_extras/nodes_model_advanced.py): mu linear in w*h/256 between 256 and 4096
        m = (max_shift - base_shift) / (4096 - 256)
        mu = width * height / (8 * 8 * 2 * 2) * m + base_shift - m * 256
        return {"kind": "flux", "mu": mu, "max_shift": max_shift, "base_shift": base_shift}
    raise TsmError(f"no ComfyUI workflow for the {family} family; it covers {', '.join(COMFYUI_DENOISER)}")


def sigma_table(sampling: Mapping) -> torch.Tensor:
    """The model_sampling ``sigmas`` buffer ComfyUI samples from (comfy/model_sampling.py), ascending, float32
    as ComfyUI keeps it.

    discrete: ModelSamplingDiscrete's SD1.x/SDXL table, sigma_t = sqrt((1 - abar_t) / abar_t) of the "linear"
    betas (sqrt-spaced 0.00085 .. 0.012, diffusers' scaled_linear) -- what ComfyUI uses for these checkpoints,
    whatever the diffusers folder's scheduler says; flow: time_snr_shift(shift, i / 1000), i = 1..1000;
    flux: flux_time_shift(mu, 1, i / 10000), i = 1..10000.
    """
    kind = sampling["kind"]
    if kind == "discrete":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, 0)
        return (((1.0 - abar) / abar) ** 0.5).float()  # (1000,)
    if kind == "flow":
        u, s = torch.arange(1, 1001) / 1000 * 1000 / 1000, sampling["shift"]  # ComfyUI's float32 steps
        return s * u / (1 + (s - 1) * u)  # (1000,)
    u, e = torch.arange(1, 10001) / 10000, math.exp(sampling["mu"])
    return e / (e + (1 / u - 1))  # (10000,)


def _model_timestep(sampling: Mapping, table: torch.Tensor, sigma: float) -> float:
    """model_sampling.timestep(sigma): the nearest table index in log sigma (discrete), else sigma * 1000
    (flow) or sigma (flux), in float32 as ComfyUI computes it."""
    s = torch.tensor(sigma, dtype=torch.float32)
    if sampling["kind"] == "discrete":
        return float((s.log() - table.double().log().float()).abs().argmin())
    return float(s * 1000) if sampling["kind"] == "flow" else float(s)


def comfy_sigmas(sampling: Mapping, scheduler: str, steps: int) -> list[float]:
    """The sigmas KSampler samples on (``calculate_sigmas`` in comfy/samplers.py) with the schedulers the
    workflow sets: ``steps`` model calls and the final 0. ddim_uniform may give more calls than ``steps``
    (ComfyUI keeps every stride of 1000 // steps: 7 steps are 8 calls).
    """
    table = sigma_table(sampling)
    n = len(table)
    if scheduler == "simple":
        stride = n / steps
        sigmas = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    elif scheduler == "ddim_uniform":
        stride = max(n // steps, 1)
        sigmas = [float(table[x]) for x in range(1, n, stride)][::-1]  # table[1] is not ~0 for these models
    else:
        raise TsmError(f"tsm computes ComfyUI's simple and ddim_uniform schedules, not {scheduler!r}")
    return [*sigmas, 0.0]


def step_timesteps(sampling: Mapping, sigmas: Sequence[float], num_timesteps: int = 1000) -> list[float]:
    """tsm's timestep t in [0, T] of each model call (every sigma but the final 0), which routes the experts:
    the table index ComfyUI feeds a discrete model, sigma * T for flow models."""
    table = sigma_table(sampling)
    scale = num_timesteps / (1000 if sampling["kind"] in ("discrete", "flow") else 1)
    return [_model_timestep(sampling, table, s) * scale for s in sigmas[:-1]]


def sigma_percent(sigma: float, sampling: Mapping) -> float:
    """The ``start_percent`` whose ``percent_to_sigma`` is ``sigma``: the inverse of comfy/model_sampling.py's
    sigma((1 - p) * 999) (discrete, log-linear in the table), time_snr_shift(shift, 1 - p) (flow) or
    flux_time_shift(mu, 1, 1 - p) (flux)."""
    kind = sampling["kind"]
    if kind == "discrete":
        logs = sigma_table(sampling).double().log()  # (1000,) ascending
        k = int(torch.searchsorted(logs, torch.tensor([math.log(sigma)], dtype=torch.float64))[0]) - 1
        k = min(max(k, 0), len(logs) - 2)
        t = k + (math.log(sigma) - float(logs[k])) / float(logs[k + 1] - logs[k])
        return 1.0 - t / 999.0
    if kind == "flow":  # time_snr_shift(s, u) = s u / (1 + (s - 1) u) = sigma
        s = sampling["shift"]
        return 1.0 - sigma / (s - (s - 1.0) * sigma)
    return 1.0 - 1.0 / (1.0 + math.exp(sampling["mu"]) * (1.0 / sigma - 1.0))  # flux_time_shift = sigma


def step_keyframes(
    owners: Sequence[int], sigmas: Sequence[float], sampling: Mapping
) -> dict[int, list[tuple[float, float]]]:
    """(start_percent, strength) keyframes of each LoRA that owns a step, ``owners[k]`` the LoRA of call k.

    A LoRA is switched on and off only between two calls, at a sigma halfway between theirs (in log sigma for
    discrete models): ComfyUI's keyframe rule (comfy/hooks.py ``prepare_current_keyframe``) activates a keyframe
    at the first call whose sigma is <= its start sigma and holds each keyframe for at least one call
    (guarantee_steps = 1), so a keyframe between calls k and k + 1 acts exactly at call k + 1. A LoRA that owns
    no call gets no keyframe (and no hook): otherwise the guaranteed call would run it next to the right one.
    The first keyframe (percent 0) rules call 0.
    """
    between = []  # the start_percent between call k and call k + 1
    for a, b in zip(sigmas[:-2], sigmas[1:-1], strict=True):
        mid = math.sqrt(a * b) if sampling["kind"] == "discrete" else (a + b) / 2
        between.append(sigma_percent(mid, sampling))
    frames: dict[int, list[tuple[float, float]]] = {}
    for lora in dict.fromkeys(owners):
        calls = [k for k, o in enumerate(owners) if o == lora]
        first, last = calls[0], calls[-1]
        if calls != list(range(first, last + 1)):
            raise TsmError(f"LoRA {lora} owns calls {calls}, which are not consecutive; sigmas must decrease")
        frames[lora] = [(0.0, 1.0)] if first == 0 else [(0.0, 0.0), (between[first - 1], 1.0)]
        if last < len(owners) - 1:
            frames[lora].append((between[last], 0.0))
    return frames


# ----------------------------------------------------------------------------------------------------
# the workflow (API JSON)
# ----------------------------------------------------------------------------------------------------
# the node inputs used here (name: required, optional) and output count, as the node definitions in nodes.py,
# comfy_extras/nodes_hooks.py, nodes_model_advanced.py, nodes_sd3.py and nodes_flux.py declare them
NODES: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "CheckpointLoaderSimple": (("ckpt_name",), (), 3),  # MODEL, CLIP, VAE
    "CLIPTextEncode": (("text", "clip"), (), 1),
    "EmptyLatentImage": (("width", "height", "batch_size"), (), 1),
    "EmptySD3LatentImage": (("width", "height", "batch_size"), (), 1),
    "ModelSamplingSD3": (("model", "shift"), (), 1),
    "ModelSamplingFlux": (("model", "max_shift", "base_shift", "width", "height"), (), 1),
    "FluxGuidance": (("conditioning", "guidance"), (), 1),
    "CreateHookLora": (("lora_name", "strength_model", "strength_clip"), ("prev_hooks",), 1),
    "CreateHookKeyframe": (("strength_mult", "start_percent"), ("prev_hook_kf",), 1),
    "SetHookKeyframes": (("hooks",), ("hook_kf",), 1),
    "CombineHooks2": ((), ("hooks_A", "hooks_B"), 1),
    "PairConditioningSetProperties": (
        ("positive_NEW", "negative_NEW", "strength", "set_cond_area"),
        ("mask", "hooks", "timesteps"),
        2,  # positive, negative
    ),
    "KSampler": (
        (
            "model",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "denoise",
        ),
        (),
        1,
    ),
    "VAEDecode": (("samples", "vae"), (), 1),
    "SaveImage": (("images", "filename_prefix"), (), 0),
    # Wan 2.2 (nodes.py, comfy_extras/nodes_hunyuan.py, nodes_images.py): the two diffusion models, UMT5, the VAE
    "UNETLoader": (("unet_name", "weight_dtype"), (), 1),
    "CLIPLoader": (("clip_name", "type"), ("device",), 1),
    "VAELoader": (("vae_name",), (), 1),
    "LoraLoaderModelOnly": (("model", "lora_name", "strength_model"), (), 1),
    "EmptyHunyuanLatentVideo": (("width", "height", "length", "batch_size"), (), 1),
    "KSamplerAdvanced": (
        (
            "model",
            "add_noise",
            "noise_seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "start_at_step",
            "end_at_step",
            "return_with_leftover_noise",
        ),
        (),
        1,
    ),  # fmt: skip
    "SaveAnimatedWEBP": (("images", "filename_prefix", "fps", "lossless", "quality", "method"), (), 0),
}


class _Graph:
    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs: object) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


# the sampler and scheduler each kind of model gets: DDIM on its uniform timesteps for DDPM models, Euler for flow
SAMPLERS = {"discrete": ("ddim", "ddim_uniform"), "flow": ("euler", "simple"), "flux": ("euler", "simple")}


def workflow(
    loras: Sequence[str],
    scale: Scale,
    sampling: Mapping,
    num_timesteps: int = 1000,
    ckpt_name: str = "model.safetensors",
    prompt: str = "",
    negative_prompt: str = "",
    steps: int = 50,
    cfg: float = 7.5,
    width: int = 512,
    height: int = 512,
    seed: int = 0,
    guidance: float = 3.5,
) -> dict[str, dict]:
    """The API-JSON graph switching ``loras`` (the file of each interval of ``scale``, lowest t first) by step.

    The keyframes come from the schedule KSampler will run (its scheduler and ``steps``, `comfy_sigmas`): each
    call's t picks its interval's LoRA, and `step_keyframes` switches only between calls, so every call runs
    exactly one LoRA; an interval no call falls in is left out. Another step count or scheduler set inside
    ComfyUI needs a new export. Flux: cfg is KSampler's (1.0 = off, as FluxPipeline) and ``guidance`` its
    embedded guidance (FluxGuidance).
    """
    kind = sampling["kind"]
    sampler_name, scheduler = SAMPLERS[kind]
    sigmas = comfy_sigmas(sampling, scheduler, steps)
    t = torch.tensor(step_timesteps(sampling, sigmas, num_timesteps))
    owners = expert_index(t, scale, num_timesteps).tolist()  # (calls,): tsm's interval of each call
    frames = step_keyframes(owners, sigmas, sampling)

    g = _Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    model = [ckpt, 0]
    if kind == "flow":  # pin the shift the percents were computed with
        model = [g.add("ModelSamplingSD3", model=model, shift=sampling["shift"]), 0]
    elif kind == "flux":
        model = [
            g.add(
                "ModelSamplingFlux",
                model=model,
                max_shift=sampling["max_shift"],
                base_shift=sampling["base_shift"],
                width=width,
                height=height,
            ),
            0,
        ]
    pos = g.add("CLIPTextEncode", text=prompt, clip=[ckpt, 1])
    neg = g.add("CLIPTextEncode", text=negative_prompt, clip=[ckpt, 1])
    hooks = _hooked(g, loras, frames)
    props = {} if hooks is None else {"hooks": [hooks, 0]}
    pair = g.add(
        "PairConditioningSetProperties",
        positive_NEW=[pos, 0],
        negative_NEW=[neg, 0],
        strength=1.0,
        set_cond_area="default",
        **props,
    )
    positive = [pair, 0]
    if kind == "flux":
        positive = [g.add("FluxGuidance", conditioning=positive, guidance=guidance), 0]
    empty = "EmptyLatentImage" if kind == "discrete" else "EmptySD3LatentImage"
    latent = g.add(empty, width=width, height=height, batch_size=1)
    samples = g.add(
        "KSampler",
        model=model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        positive=positive,
        negative=[pair, 1],
        latent_image=[latent, 0],
        denoise=1.0,
    )
    image = g.add("VAEDecode", samples=[samples, 0], vae=[ckpt, 2])
    g.add("SaveImage", images=[image, 0], filename_prefix="tsm")
    return g.nodes


def _hooked(g: _Graph, loras: Sequence[str], frames: Mapping[int, list[tuple[float, float]]]) -> str | None:
    """One CreateHookLora per LoRA that owns a call, scheduled by its keyframes, combined: the hooks node."""
    hooks = None
    for index in sorted(frames):
        lora = g.add("CreateHookLora", lora_name=loras[index], strength_model=1.0, strength_clip=0.0)
        kf = None
        for start, strength in frames[index]:
            extra = {} if kf is None else {"prev_hook_kf": [kf, 0]}
            kf = g.add("CreateHookKeyframe", strength_mult=strength, start_percent=start, **extra)
        scheduled = g.add("SetHookKeyframes", hooks=[lora, 0], hook_kf=[kf, 0])
        hooks = (
            scheduled if hooks is None else g.add("CombineHooks2", hooks_A=[hooks, 0], hooks_B=[scheduled, 0])
        )
    return hooks


# the files of Comfy-Org/Wan_2.2_ComfyUI_Repackaged, the names ComfyUI's Wan 2.2 templates load
WAN22_FILES = {
    "high": "wan2.2_t2v_high_noise_14B_fp16.safetensors",
    "low": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
    "clip": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "vae": "wan_2.1_vae.safetensors",
}


def wan22_switch(
    shift: float, steps: int, boundary: float, num_timesteps: int = 1000
) -> tuple[list[float], int]:
    """(sigmas, switch): the schedule KSamplerAdvanced runs (ModelSamplingSD3 ``shift``, euler / simple, ``steps``)
    and the first step whose t = sigma * T is below ``boundary``: steps before it are the high-noise model's,
    as WanPipeline switches (t >= boundary -> ``transformer``)."""
    sigmas = comfy_sigmas({"kind": "flow", "shift": shift}, "simple", steps)
    t = step_timesteps({"kind": "flow", "shift": shift}, sigmas, num_timesteps)
    return sigmas, next((k for k, tk in enumerate(t) if tk < boundary), steps)


def wan22_workflow(
    loras: Mapping[str, Sequence[str]],
    scales: Mapping[str, Scale],
    boundary: float,
    shift: float,
    num_timesteps: int = 1000,
    files: Mapping[str, str] = WAN22_FILES,
    prompt: str = "",
    negative_prompt: str = "",
    steps: int = 50,
    cfg: float = 5.0,
    width: int = 480,
    height: int = 480,
    length: int = 81,
    seed: int = 0,
) -> dict[str, dict]:
    """ComfyUI's two-sampler Wan 2.2 graph: KSamplerAdvanced on the high-noise model for steps [0, switch), on
    the low-noise model for [switch, steps) (`wan22_switch`), each model with its own LoRAs: ``loras["high"]`` /
    ``loras["low"]`` (lowest t first) over the intervals of ``scales["high"]`` / ``scales["low"]`` (tsm's
    ``transformer`` / ``transformer_2`` experts). One LoRA on a side: LoraLoaderModelOnly; several: hook LoRAs
    on that sampler's conditioning, keyframed per call as `step_keyframes` places them for its calls."""
    sampling = {"kind": "flow", "shift": shift}
    sigmas, switch = wan22_switch(shift, steps, boundary, num_timesteps)
    t = torch.tensor(step_timesteps(sampling, sigmas, num_timesteps))  # (steps,)
    g = _Graph()
    clip = g.add("CLIPLoader", clip_name=files["clip"], type="wan")
    vae = g.add("VAELoader", vae_name=files["vae"])
    pos = g.add("CLIPTextEncode", text=prompt, clip=[clip, 0])
    neg = g.add("CLIPTextEncode", text=negative_prompt, clip=[clip, 0])
    latent = [g.add("EmptyHunyuanLatentVideo", width=width, height=height, length=length, batch_size=1), 0]
    for side, (lo, hi) in (("high", (0, switch)), ("low", (switch, steps))):
        model = [g.add("UNETLoader", unet_name=files[side], weight_dtype="default"), 0]
        model = [
            g.add("ModelSamplingSD3", model=model, shift=shift),
            0,
        ]  # the shift the switch was placed for
        positive, negative = [pos, 0], [neg, 0]
        names = list(loras.get(side, ()))
        if len(names) == 1:
            model = [g.add("LoraLoaderModelOnly", model=model, lora_name=names[0], strength_model=1.0), 0]
        elif names and hi > lo:
            owners = expert_index(t[lo:hi], scales[side], num_timesteps).tolist()
            hooks = _hooked(g, names, step_keyframes(owners, sigmas[lo : hi + 1], sampling))
            pair = g.add(
                "PairConditioningSetProperties", positive_NEW=positive, negative_NEW=negative, strength=1.0,
                set_cond_area="default", hooks=[hooks, 0],
            )  # fmt: skip
            positive, negative = [pair, 0], [pair, 1]
        latent = [
            g.add(
                "KSamplerAdvanced", model=model, add_noise="enable" if side == "high" else "disable",
                noise_seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="simple",
                positive=positive, negative=negative, latent_image=latent, start_at_step=lo,
                end_at_step=hi if side == "high" else 10000,
                return_with_leftover_noise="enable" if side == "high" else "disable",
            ),
            0,
        ]  # fmt: skip
    images = g.add("VAEDecode", samples=latent, vae=[vae, 0])
    g.add("SaveAnimatedWEBP", images=[images, 0], filename_prefix="tsm", fps=16.0, lossless=False, quality=90,
          method="default")  # fmt: skip
    return g.nodes


def check_graph(graph: Mapping[str, Mapping]) -> None:
    """Raise if a node is unknown, misses a required input, has an unknown one, or a link does not resolve."""
    for node_id, node in graph.items():
        required, optional, _ = NODES[node["class_type"]]
        inputs = node["inputs"]
        missing, unknown = set(required) - set(inputs), set(inputs) - set(required) - set(optional)
        if missing or unknown:
            raise ValueError(f"node {node_id} {node['class_type']}: missing {missing}, unknown {unknown}")
        for name, value in inputs.items():
            if isinstance(value, list):
                src, index = value
                if src not in graph or not 0 <= index < NODES[graph[src]["class_type"]][2]:
                    raise ValueError(
                        f"node {node_id}.{name} links to output {index} of {src}, which has none"
                    )


def write_workflow(
    directory: PathLike, loras: Sequence[str], scale: Scale, sampling: Mapping, **kw: object
) -> Path:
    """Write ``directory/workflow_api.json`` (`workflow`'s graph, checked by `check_graph`)."""
    graph = workflow(loras, scale, sampling, **kw)
    check_graph(graph)
    path = Path(directory) / "workflow_api.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(graph, indent=2))
    return path


def export_run(
    denoiser: torch.nn.Module,
    family: str,
    scheduler_config: Mapping,
    directory: PathLike,
    prefix: str,
    width: int = 512,
    height: int = 512,
    **kw: object,
) -> list[Path]:
    """One ComfyUI LoRA per finest-scale interval of ``denoiser`` and the workflow switching them; the paths
    (the LoRA files, for ComfyUI's models/loras/, then ``workflow_api.json``).

    Fostered (or one-scale) experts: interval i's file is its core expert, exactly. Assembled with a timestep-only
    router: the stacked step LoRA (`tsm.io.export_step_lora`) at the interval's middle t, exact only where
    E[t] is constant within the interval. A router that reads the layer's input is not a LoRA: refused.
    ``kw`` goes to `workflow` (ckpt_name, prompt, negative_prompt, steps, cfg, seed, guidance).
    """
    routing = get_routing(denoiser)
    spec = routing.spec
    assembled = routing.stage == "assemble" and len(spec.scales) > 1
    if assembled and spec.router != "t_only":
        raise TsmError(
            f"the {spec.router} router's gates depend on the layer's input (F(z)), so an assembled step is not a "
            "LoRA and no ComfyUI workflow can switch it; export a fostered run, or assemble with router t_only"
        )
    if spec.routing == "smooth":
        raise TsmError(
            "smooth routing blends two experts with weights that change every step, which one LoRA per interval "
            "cannot switch; export per-step LoRAs with `tsm export RUN --timesteps ...`, or train with hard routing"
        )
    sampling = sampling_of(family, scheduler_config, width, height)
    directory = Path(directory)
    paths = []
    for i in range(spec.experts_per_scale[0]):
        lo, hi = interval_bounds(i, spec.scales[0], spec.num_timesteps)
        if assembled:
            state = io.step_lora_state(denoiser, (lo + hi) / 2, prefix=prefix)
        else:
            state = io.lora_state(denoiser, scale=0, index=i, prefix=prefix)
        paths.append(save_as(state, directory / f"tsm_s0_i{i}.safetensors", "comfyui", family))
    names = [p.name for p in paths]
    kw = {"num_timesteps": spec.num_timesteps, "width": width, "height": height, **kw}
    return [*paths, write_workflow(directory, names, spec.scales[0], sampling, **kw)]
