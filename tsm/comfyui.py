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
    CLIP text kohya (``lora_te_`` for one text encoder, ``lora_te1_`` / ``lora_te2_`` for two), the
    encoders names ``model_lora_keys_clip`` maps for clip_l / clip_g (q/k/v/out_proj, fc1, fc2)

The workflow (`workflow`) is ComfyUI's API JSON: one ``CreateHookLoRA`` per finest-scale interval, scheduled by
``CreateHookKeyframe`` / ``SetHookKeyframes``, combined with ``CombineHooks2`` and attached to both the
positive and negative conditioning by ``PairConditioningSetProperties``. A keyframe's ``start_percent`` is
computed with ComfyUI's own percent -> sigma convention (``comfy/model_sampling.py`` ``percent_to_sigma``).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tsm import io
from tsm.errors import TsmError
from tsm.inject import get_routing
from tsm.intervals import interval_bounds

PathLike = io.PathLike
FORMATS = ("diffusers", "kohya", "comfyui")
COMFYUI_DENOISER = {
    "sd15": "kohya",
    "sdxl": "kohya",
    "sd3": "diffusers",
    "flux": "diffusers",
}  # per family, see the docstring
COMFYUI_TEXT = {
    "sd15": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2"),
    "flux": ("text_encoder",),
}
KOHYA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
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
    out.update(to_kohya(denoiser) if COMFYUI_DENOISER[family] == "kohya" else denoiser)
    return out


def convert_file(src: PathLike, dst: PathLike, fmt: str, family: str = "", text_encoders: int = 1) -> Path:
    """Rewrite a diffusers-format LoRA file written by tsm as ``fmt`` (diffusers, kohya or comfyui)."""
    if fmt not in FORMATS:
        raise TsmError(f"unknown LoRA format {fmt!r}; choose from {', '.join(FORMATS)}")
    metadata, tensors = io._open(src, read_tensors=True)
    if fmt == "diffusers":
        out, meta = tensors, metadata
    elif fmt == "kohya":
        out, meta = to_kohya(tensors, text_encoders), kohya_metadata(tensors, metadata)
    else:
        out = to_comfyui(tensors, family, text_encoders)
        meta = kohya_metadata(tensors, metadata) if any(k.startswith("lora_") for k in out) else metadata
    return io._atomic_save(out, dst, meta)


# ----------------------------------------------------------------------------------------------------
# ComfyUI's percent -> sigma, and the percent of a timestep boundary
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


def boundary_percent(t: float, sampling: Mapping, num_timesteps: int = 1000) -> float:
    """ComfyUI's ``start_percent`` at which sampling passes below timestep boundary ``t`` (tsm's t in [0, T]).

    discrete: ComfyUI feeds the model the nearest integer t of its sigma table, so the experts' integer
    boundary b = ceil(t) is crossed halfway between table entries b and b - 1: (1 - p) * 999 = b - 0.5 (sigma is
    log-linear between entries). flow: t = sigma * T and ``percent_to_sigma(p) = shift(1 - p)``, solved for p.
    """
    kind = sampling["kind"]
    if kind == "discrete":
        return min(max(1.0 - (math.ceil(t) - 0.5) / 999.0, 0.0), 1.0)
    sigma = t / num_timesteps
    if sigma >= 1.0:
        return 0.0
    if sigma <= 0.0:
        return 1.0
    if kind == "flow":  # time_snr_shift(s, u) = s u / (1 + (s - 1) u) = sigma
        s = sampling["shift"]
        u = sigma / (s - (s - 1.0) * sigma)
    else:  # flux_time_shift(mu, 1, u) = e^mu / (e^mu + 1/u - 1) = sigma
        u = 1.0 / (1.0 + math.exp(sampling["mu"]) * (1.0 / sigma - 1.0))
    return 1.0 - u


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
}


class _Graph:
    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs: object) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def keyframes(lo: float, hi: float, sampling: Mapping, num_timesteps: int) -> list[tuple[float, float]]:
    """(start_percent, strength) of the expert owning [lo, hi): on from below hi, off from below lo."""
    on = boundary_percent(hi, sampling, num_timesteps) if hi < num_timesteps else 0.0
    frames = [] if on == 0.0 else [(0.0, 0.0)]
    frames.append((on, 1.0))
    if lo > 0:
        frames.append((boundary_percent(lo, sampling, num_timesteps), 0.0))
    return frames


def workflow(
    loras: Sequence[tuple[str, float, float]],
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
    """The API-JSON graph: (lora file name, lo, hi) per interval, each a hook LoRA on [lo, hi) of t.

    Flux: cfg is KSampler's (1.0 = off, as FluxPipeline) and ``guidance`` its embedded guidance (FluxGuidance).
    """
    g = _Graph()
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    model = [ckpt, 0]
    kind = sampling["kind"]
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
    hooks = None
    for name, lo, hi in loras:
        lora = g.add("CreateHookLora", lora_name=name, strength_model=1.0, strength_clip=0.0)
        kf = None
        for start, strength in keyframes(lo, hi, sampling, num_timesteps):
            extra = {} if kf is None else {"prev_hook_kf": [kf, 0]}
            kf = g.add("CreateHookKeyframe", strength_mult=strength, start_percent=start, **extra)
        scheduled = g.add("SetHookKeyframes", hooks=[lora, 0], hook_kf=[kf, 0])
        hooks = (
            scheduled if hooks is None else g.add("CombineHooks2", hooks_A=[hooks, 0], hooks_B=[scheduled, 0])
        )
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
    sampler = ("ddim", "ddim_uniform") if kind == "discrete" else ("euler", "simple")
    samples = g.add(
        "KSampler",
        model=model,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler[0],
        scheduler=sampler[1],
        positive=positive,
        negative=[pair, 1],
        latent_image=[latent, 0],
        denoise=1.0,
    )
    image = g.add("VAEDecode", samples=[samples, 0], vae=[ckpt, 2])
    g.add("SaveImage", images=[image, 0], filename_prefix="tsm")
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
    directory: PathLike, loras: Sequence[tuple[str, float, float]], sampling: Mapping, **kw: object
) -> Path:
    """Write ``directory/workflow_api.json`` (the LoRA files go to ComfyUI's models/loras/)."""
    graph = workflow(loras, sampling, **kw)
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
    """One ComfyUI LoRA per finest-scale interval of ``denoiser`` and the workflow switching them; the paths.

    Fostered (or one-scale) experts: interval i's file is its core expert, exactly. Assembled with a timestep-only
    router: the stacked step LoRA (`tsm.io.export_step_lora`) at the interval's middle t, exact only where
    E[t] is constant within the interval. A router that reads the layer's input is not a LoRA: refused.
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
    paths, loras = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(spec.experts_per_scale[0]):
            lo, hi = interval_bounds(i, spec.scales[0], spec.num_timesteps)
            src = Path(tmp) / f"{i}.safetensors"
            if assembled:
                io.export_step_lora(denoiser, (lo + hi) / 2, src, prefix=prefix)
            else:
                io.export_lora(denoiser, src, scale=0, index=i, prefix=prefix)
            name = f"tsm_s0_i{i}.safetensors"
            paths.append(convert_file(src, directory / name, "comfyui", family))
            loras.append((name, lo, hi))
    paths.append(
        write_workflow(
            directory, loras, sampling, num_timesteps=spec.num_timesteps, width=width, height=height, **kw
        )
    )
    return paths
