"""Checkpoints of timestep experts (safetensors + metadata), and experts as plain diffusers/PEFT LoRA files.

``save``/``load`` keep every expert and router parameter, named relative to the model
(``...attn1.to_q.lora_A.s0_i3``, ``...attn1.to_q.router.table``), with the `ExpertSpec` and the stage in the
file's metadata, so a checkpoint says what model it fits. Files are safetensors only: nothing is unpickled.

``export_lora`` writes one expert as the LoRA file diffusers' ``save_lora_weights`` would write
(``unet.{module}.lora_A.weight`` / ``lora_B.weight``; given {component: model}, every part's expert of the same
interval in one file), so ``pipe.load_lora_weights(path)`` gives the same model at that expert's timesteps;
``import_lora`` goes the other way, to start experts from an existing LoRA.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tsm.errors import TsmError
from tsm.inject import ATTR, expert_layers, get_routing
from tsm.intervals import check_timesteps, expert_index, interval_bounds
from tsm.routing import hat_weights
from tsm.spec import ExpertSpec

FORMAT = "1"  # tsm_format in the metadata; bump when the key layout changes
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")  # pipeline prefixes
PEFT_PREFIX = "base_model.model."  # what PEFT's PeftModel puts in front of module names
# LoRA key suffixes we read: PEFT/diffusers names, and the kohya-style down/up names
LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".alpha": "alpha",
}
SPEC_FIELDS_IGNORED = ("dropout",)  # changes training noise only, not what the weights compute

PathLike = str | os.PathLike
Models = nn.Module | Mapping[str, nn.Module]  # one model, or {pipeline component: model} for one file


# ----------------------------------------------------------------------------------------------------
# file helpers
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_path(path: PathLike) -> Iterator[str]:
    """A temp file beside ``path`` to write; it replaces ``path`` when the block ends, and is removed if the block
    fails, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one filesystem
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file through a temp file in the same directory, so a crash never leaves half a file."""
    with _atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    return Path(path)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file (a results JSON) whole or not at all, as `_atomic_save` writes weights."""
    with _atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def _open(path: PathLike, read_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; any failure becomes one line saying what to do."""
    path = Path(path)
    if not path.exists():
        raise TsmError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise TsmError(f"{path} is a directory; pass the .safetensors file inside it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if read_tensors else {}
    except Exception as e:  # SafetensorError, OSError, decode errors: never a deep traceback
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TsmError(
            f"cannot read {path} as safetensors ({reason}); the file is truncated, corrupt or another format"
        ) from None
    return metadata, tensors


def read_metadata(path: PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (empty if it has none), without reading its tensors (``tsm info``)."""
    return _open(path, read_tensors=False)[0]


def _spec_of(metadata: Mapping[str, str], path: PathLike) -> ExpertSpec:
    if "tsm_spec" not in metadata:
        raise TsmError(
            f"{path} is not a tsm checkpoint (no tsm metadata); for a plain LoRA file use tsm.import_lora"
        )
    return ExpertSpec.from_json(metadata["tsm_spec"])


def read_spec(path: PathLike) -> ExpertSpec:
    """The `ExpertSpec` stored in a tsm checkpoint (or in an expert exported by `export_lora`)."""
    return _spec_of(read_metadata(path), path)


def _few(names: Iterable[str], n: int = 3) -> str:
    """'a, b, c (+5 more)': enough names to find the problem, on one line."""
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ----------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------
def expert_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every expert and router parameter, named relative to the model (the base layers are left out)."""
    get_routing(model)
    state = {}
    for name, layer in expert_layers(model):
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer."):
                state[f"{name}.{pname}"] = p
    return state


def save(model: nn.Module, path: PathLike, component: str | None = None) -> Path:
    """Write the model's experts and routers to ``path`` (safetensors), with the spec and stage as metadata;
    ``component``: the pipeline part the model is (``transformer_2``...), checked by `load`."""
    routing = get_routing(model)
    metadata = {"tsm_format": FORMAT, "tsm_spec": routing.spec.to_json(), "tsm_stage": routing.stage}
    if component is not None:
        metadata["tsm_component"] = component
    return _atomic_save(expert_state(model), path, metadata)


def check_component(metadata: Mapping[str, str], component: str | None, path: PathLike) -> None:
    """Refuse a file written for another pipeline part (Wan 2.2's ``transformer`` vs ``transformer_2``: the
    same layers, so shapes alone would not tell)."""
    written = metadata.get("tsm_component")
    if component is not None and written is not None and written != component:
        raise TsmError(
            f"{path} holds the experts of {written}, not {component} (Wan 2.2: transformer is the high-noise, "
            f"transformer_2 the low-noise model); pass the {component} file"
        )


def _spec_diff(
    file: ExpertSpec, model: ExpertSpec, ignored: tuple[str, ...] = SPEC_FIELDS_IGNORED
) -> list[str]:
    """'rank 4 != 8' for every field that differs (file value first), compared as their JSON forms."""
    a, b = json.loads(json.dumps(file.as_dict())), json.loads(json.dumps(model.as_dict()))
    return [f"{k} {a[k]} != {b[k]}" for k in a if k not in ignored and a[k] != b.get(k)]


def load(
    model: nn.Module, path: PathLike, experts_only: bool = False, component: str | None = None
) -> dict[str, str]:
    """Load a checkpoint written by `save` into a model that has the same experts; returns the metadata.

    The model's stage is left as it is (the file's stage is ``metadata["tsm_stage"]``): loading a fostered
    checkpoint into a model about to be assembled is the normal flow. ``experts_only`` loads the experts
    and leaves the routers as they are, so the router variant may differ (assembling ablations).
    """
    routing = get_routing(model)
    metadata, tensors = _open(path, read_tensors=True)
    check_component(metadata, component, path)
    if "tsm_format" not in metadata:
        _spec_of(metadata, path)  # raises the "not a tsm checkpoint" error
        raise TsmError(f"{path} is an expert exported as a LoRA, not a checkpoint; use tsm.import_lora")
    if metadata["tsm_format"] != FORMAT:
        raise TsmError(f"{path} has tsm_format {metadata['tsm_format']!r}, this tsm reads {FORMAT!r}")
    ignored = SPEC_FIELDS_IGNORED + (("router",) if experts_only else ())
    diff = _spec_diff(_spec_of(metadata, path), routing.spec, ignored)
    if diff:
        raise TsmError(
            f"{path} holds other experts than the model ({'; '.join(diff)}; file != model); "
            "add experts with tsm.read_spec(path) to load it"
        )
    params = expert_state(model)
    if experts_only:
        params = {k: p for k, p in params.items() if ".router." not in k}
        tensors = {k: v for k, v in tensors.items() if ".router." not in k}
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing or unexpected:
        raise TsmError(
            f"{path} does not fit {type(model).__name__}: missing {len(missing)} key(s) [{_few(missing)}], "
            f"unexpected {len(unexpected)} [{_few(unexpected)}]; was it saved from another model?"
        )
    bad = [
        f"{k} {tuple(tensors[k].shape)} != {tuple(p.shape)}"
        for k, p in params.items()
        if p.shape != tensors[k].shape
    ]
    if bad:
        raise TsmError(f"{path}: shapes differ from the model's (file != model): {_few(bad)}")
    for _, layer in expert_layers(model):
        layer.unmerge()  # a merged base weight holds the old expert
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    return metadata


def _form_words(spec: ExpertSpec, exported: bool) -> str:
    """What sets the experts apart from the paper's (hard interval experts, nothing shared), in a few words."""
    words = []
    if spec.shared_rank:
        whole = f" (so each file is one LoRA of rank {spec.shared_rank + spec.rank})" if exported else ""
        words.append(f"shared + residual: a full-range LoRA of rank {spec.shared_rank} on every t{whole}")
    if spec.routing != "hard":
        words.append(f"{spec.routing} routing")
    if spec.modulation != "none":
        words.append(f"rank channels modulated by t ({spec.modulation}, {spec.modulation_bins} bins)")
    if spec.rank_schedule != "none":
        words.append(f"rank schedule {spec.rank_schedule} (min rank {spec.min_rank})")
    return "; ".join(words)


def describe(path: PathLike) -> str:
    """A few lines saying what a tsm checkpoint (or an exported expert, or a plain LoRA) holds."""
    metadata, tensors = _open(path, read_tensors=True)
    size = sum(v.numel() for v in tensors.values())
    lines = [f"{path}: {len(tensors)} tensors, {size:,} values"]
    if "tsm_spec" not in metadata:
        lines.append("  no tsm metadata: a plain LoRA file? (tsm.import_lora reads it)")
        return "\n".join(lines)
    spec = ExpertSpec.from_json(metadata["tsm_spec"])
    exported = "tsm_format" not in metadata  # an export_lora file; a checkpoint carries tsm's own format
    kind = "exported expert (diffusers LoRA format)" if exported else "checkpoint"
    lines.append(f"  {kind}; stage: {metadata.get('tsm_stage', '-')}")
    lines.append(
        f"  scales: {list(spec.scales)} -> experts per scale {list(spec.experts_per_scale)}; rank {spec.rank}, "
        f"alpha {spec.alpha:g}; router: {spec.router}; T = {spec.num_timesteps}"
    )
    form = _form_words(spec, exported)
    if form:
        lines.append(f"  form: {form}")
    layers = sorted({k.split(".lora_")[0] for k in tensors if ".lora_" in k})
    lines.append(f"  {len(layers)} layers, targets {spec.targets}")
    routers = sum(v.numel() for k, v in tensors.items() if ".router." in k)
    lines.append(f"  expert values: {size - routers:,}; router values: {routers:,}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# one expert <-> a plain LoRA file
# ----------------------------------------------------------------------------------------------------
def _class_prefix(model: nn.Module) -> str:
    """The component kind the model's class implies: unet, transformer, text_encoder, or "" (not a pipeline part)."""
    classes = type(model).__mro__
    if any(c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers") for c in classes):
        return "unet" if "UNet" in type(model).__name__ else "transformer"
    if any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in classes):
        return "text_encoder"
    return ""


def _same_kind(component: str, guess: str) -> bool:
    """Whether pipeline component ``component`` can hold a model whose class implies ``guess``."""
    if guess == "text_encoder":
        return component.startswith("text_encoder")
    return component in ("unet", "transformer")


def _loaded_from(model: nn.Module) -> str:
    """Where from_pretrained read the model (its config's ``_name_or_path``), or "" when it was built in Python."""
    config = getattr(model, "config", None)
    where = (
        config.get("_name_or_path") if isinstance(config, Mapping) else getattr(config, "_name_or_path", None)
    )
    return where if isinstance(where, str) else ""


def _known_prefix(model: nn.Module) -> tuple[str, bool]:
    """(prefix, known): the component `default_prefix` gives, and whether it is known rather than guessed."""
    guess = _class_prefix(model)
    where = _loaded_from(model)
    if not guess or not where:
        return guess, not guess
    folder = Path(where)
    if folder.name in COMPONENTS and _same_kind(folder.name, guess):
        return folder.name, True  # a pipeline's from_pretrained loads each part from its component folder
    try:  # from_pretrained(root, subfolder=...): the pipeline folder's index lists its components
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return guess, False  # a hub id, or not a pipeline folder
    if not isinstance(index, dict):
        return guess, False
    candidates = [  # the components of the model's kind and class (a VAE matches none)
        k
        for k, v in index.items()
        if k in COMPONENTS
        and _same_kind(k, guess)
        and isinstance(v, list)
        and v[-1:] == [type(model).__name__]
    ]
    if len(candidates) > 1:
        raise TsmError(
            f"{where} has {len(candidates)} components a {type(model).__name__} can be "
            f"({', '.join(sorted(candidates))}); pass prefix= to say which one this is"
        )
    return (candidates[0], True) if candidates else (guess, False)


def default_prefix(model: nn.Module) -> str:
    """The pipeline component name diffusers expects in the model's LoRA keys, when no ``prefix=`` is given.

    A fallback for the Python API: ``tsm export`` passes the component name it loaded (``text_encoder_2``...),
    and an explicit ``prefix=`` always wins. Without one, the folder the model was loaded from decides when it
    can (a pipeline's from_pretrained loads ``text_encoder_2`` from ``.../text_encoder_2``; a pipeline folder
    whose model_index.json lists one matching component); a folder with several candidates (SD3's two CLIP
    encoders, loaded with ``subfolder=``) raises rather than guess. Otherwise the class decides: unet or
    transformer for a diffusers model, text_encoder for a transformers one (wrong for a second or third
    text encoder built in Python: pass ``prefix="text_encoder_2"``), "" for anything else.
    """
    return _known_prefix(model)[0]


def _expert_keys(spec: ExpertSpec, scale: int | None, index: int | None) -> list[str]:
    """Parameter keys of the experts chosen by (scale, index); None picks all of them."""
    counts = spec.experts_per_scale
    if index is not None and scale is None:
        raise TsmError("index needs a scale too: pass scale=s, index=i")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, int) or not 0 <= scale < len(counts)
    ):
        raise TsmError(f"scale must be an int in [0, {len(counts)}) (0 is the finest), got {scale!r}")
    if index is not None and (
        isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < counts[scale]
    ):
        raise TsmError(
            f"scale {scale} has {counts[scale]} experts; index must be in [0, {counts[scale]}), got {index!r}"
        )
    return [
        f"s{s}_i{i}"
        for s, n in enumerate(counts)
        for i in range(n)
        if scale in (None, s) and index in (None, i)
    ]


def _check_exportable(name: str, layer: nn.Module) -> None:
    if layer.conv_fn is not None and any(d != 1 for d in layer.base_layer.dilation):
        raise TsmError(
            f"{name} is a dilated conv, and PEFT's LoRA convs ignore dilation: the exported expert would "
            "compute something else; drop it from the targets to export"
        )


def _components(models: Models, prefix: str | None) -> list[tuple[str, nn.Module]]:
    """(key prefix, model) of each part to export: one model (its `default_prefix` unless ``prefix`` says),
    or a mapping {component: model} for several parts of one pipeline in one file."""
    if not isinstance(models, Mapping):
        return [(default_prefix(models) if prefix is None else prefix, models)]
    if prefix is not None:
        raise TsmError("prefix= names one model's component; a mapping names each part by its key")
    if not models:
        raise TsmError("nothing to export: the mapping of models is empty")
    bare = [name for name, model in models.items() if getattr(model, ATTR, None) is None]
    if bare:
        raise TsmError(f"{', '.join(bare)} has no experts; leave it out of the mapping")
    return list(models.items())


def _shared_spec(parts: list[tuple[str, nn.Module]]) -> ExpertSpec:
    """The first part's spec; every part must cut [0, T] into the same intervals, so that expert (s, i) of
    each part is the one the sampler runs on the same timesteps."""
    (name, first), *rest = parts
    spec = get_routing(first).spec
    for other, model in rest:
        o = get_routing(model).spec
        if (o.scales, o.num_timesteps, o.routing) != (spec.scales, spec.num_timesteps, spec.routing):
            raise TsmError(
                f"{other}'s experts cut the timesteps otherwise than {name}'s (scales {list(o.scales)} != "
                f"{list(spec.scales)}); export each part on its own"
            )
    return spec


def _head(prefix: str) -> str:
    return f"{prefix}." if prefix else ""


def lora_state(
    models: Models, scale: int = 0, index: int = 0, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file `export_lora` writes, without writing it."""
    parts = _components(models, prefix)
    spec = _shared_spec(parts)
    if scale is None or index is None:
        raise TsmError("export_lora writes one expert: pass scale=s and index=i (export_all_lora writes all)")
    if spec.modulation != "none" or spec.rank_schedule != "none":
        # the LoRA differs at every t (d(t) or its active ranks): no one file is the model at an interval
        form = f"modulation={spec.modulation}" if spec.modulation != "none" else "rank_schedule=tlora"
        raise TsmError(
            f"experts with {form} are a different LoRA at every t; export the LoRA of each sampling step "
            "(tsm export RUN --timesteps T ... --out DIR, or tsm.io.export_step_lora)"
        )
    (key,) = _expert_keys(spec, scale, index)
    tensors = {}
    for head, model in parts:
        for name, layer in expert_layers(model):
            _check_exportable(name, layer)
            a, b = _stacked(layer, [(key, 1.0)])
            # A: (r0 + r, in[, *k]), B: (out, r0 + r[, 1..]); r0 = 0 without a shared expert
            tensors[f"{_head(head)}{name}.lora_A.weight"] = a
            tensors[f"{_head(head)}{name}.lora_B.weight"] = b
    lo, hi = interval_bounds(index, spec.scales[scale], spec.num_timesteps)
    expert = {"scale": scale, "index": index, "interval": [lo, hi]}
    # "format": "pt" is what diffusers' own save_lora_weights writes
    metadata = {"format": "pt", "tsm_spec": spec.to_json(), "tsm_expert": json.dumps(expert)}
    if isinstance(models, Mapping):
        metadata["tsm_components"] = json.dumps([head for head, _ in parts])
    return tensors, metadata


def export_lora(
    models: Models, path: PathLike, scale: int = 0, index: int = 0, prefix: str | None = None
) -> Path:
    """Write expert (``scale``, ``index``) as a diffusers/PEFT LoRA file: ``{prefix}.{module}.lora_A.weight``.

    ``models``: one model, or {component: model} -- e.g. ``c.modules()``, the denoiser and its text encoders --
    to write every part's expert (s, i) into one file with each part's component name in front, as
    ``pipe.load_lora_weights`` splits it (the parts must cut the timesteps into the same intervals).
    alpha / rank is baked into lora_B and no alpha is written, because diffusers loads a LoRA without alpha
    metadata with lora_alpha = r, i.e. scale 1.0. ``prefix`` (one model only) defaults to `default_prefix`; ""
    writes none, for ``unet.load_lora_adapter(path, prefix=None)`` or PEFT (``pipe.load_lora_weights`` would
    only warn and load nothing).
    """
    tensors, metadata = lora_state(models, scale, index, prefix)
    return _atomic_save(tensors, path, metadata)


def _stacked(layer: nn.Module, terms: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA (A, B) with B A = sum_k w_k s B_k A_k (+ s0 B0 A0 with a shared expert, first): the ranks
    concatenated, every scaling and weight baked into B, as diffusers loads a LoRA without alpha at scale 1."""
    a = [layer.lora_A[k].detach() for k, _ in terms]
    b = [w * layer.scaling * layer.lora_B[k].detach() for k, w in terms]
    if layer.shared_A is not None:
        a.insert(0, layer.shared_A.detach())
        b.insert(0, layer.shared_scaling * layer.shared_B.detach())
    return torch.cat(a), torch.cat(b, 1)


def _core_terms(spec: ExpertSpec, t: float) -> list[tuple[str, float]]:
    """The finest-scale expert(s) of t and their weights: one (hard), or the smooth blend of two."""
    tt = torch.tensor([float(t)])
    if spec.routing == "hard":
        return [(f"s0_i{int(expert_index(tt, spec.scales[0], spec.num_timesteps)[0])}", 1.0)]
    lo, hi, w = hat_weights(tt, spec.scales[0], spec.num_timesteps)
    lo, hi, w = int(lo[0]), int(hi[0]), float(w[0])
    return [(f"s0_i{lo}", 1.0)] if w == 0.0 else [(f"s0_i{lo}", 1.0 - w), (f"s0_i{hi}", w)]


def export_all_lora(models: Models, directory: PathLike, prefix: str | None = None) -> list[Path]:
    """Export every expert to ``directory/expert_s{scale}_i{index}.safetensors``; returns the paths.

    ``models``: one model, or {component: model} (each file then holds expert (s, i) of every part)."""
    spec = _shared_spec(_components(models, prefix))
    return [
        export_lora(models, Path(directory) / f"expert_s{s}_i{i}.safetensors", s, i, prefix)
        for s, n in enumerate(spec.experts_per_scale)
        for i in range(n)
    ]


def _assembled(model: nn.Module) -> bool:
    routing = get_routing(model)
    return routing.stage == "assemble" and len(routing.spec.scales) > 1


def _context_keys(model: nn.Module, name: str, t: float) -> list[str]:
    """The context experts a step at t runs in ``model`` (assembled only); raises where the step is no LoRA."""
    spec = get_routing(model).spec
    if not _assembled(model):
        return []
    if spec.router != "t_only":
        raise TsmError(
            f"the {spec.router} router's gates of {name} depend on the layer's input, so an assembled step is "
            "not a LoRA; export the core experts (--scale 0 --index i) or assemble with experts.router=t_only"
        )
    tt = torch.tensor(float(t))
    return [
        f"s{s}_i{int(expert_index(tt, sc, spec.num_timesteps))}" for s, sc in enumerate(spec.scales) if s > 0
    ]


def step_lora_state(
    models: Models, t: float, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file `export_step_lora` writes, without writing it."""
    parts = _components(models, prefix)
    spec = _shared_spec(parts)
    check_timesteps(torch.tensor([float(t)]), spec.num_timesteps)
    if all(not _assembled(m) for _, m in parts) and spec.routing == "hard" and not spec.varies_in_rank:
        index = int(expert_index(torch.tensor(float(t)), spec.scales[0], spec.num_timesteps))
        return lora_state(models, scale=0, index=index, prefix=prefix)
    t_index = min(int(float(t)), spec.num_timesteps - 1)
    core = _core_terms(spec, t)
    tensors, experts = {}, {}
    for head, model in parts:
        context = _context_keys(model, head or type(model).__name__, t)
        experts[head] = [k for k, _ in core] + context
        for name, layer in expert_layers(model):
            _check_exportable(name, layer)
            gates = (layer.router.table[t_index] + layer.router.offset).detach().tolist() if context else []
            # the core is always on; context expert j weighted by its gate E[t]_j
            a, b = _stacked(layer, core + list(zip(context, gates, strict=True)))
            if layer.varies_in_rank:  # one LoRA, no shared expert: B diag(d(t)) A with d(t) baked into B
                b = b * layer.step_factor(t).reshape(1, -1, *[1] * (b.dim() - 2))
            tensors[f"{_head(head)}{name}.lora_A.weight"] = a  # (r0 + sum of ranks, in[, *k])
            tensors[f"{_head(head)}{name}.lora_B.weight"] = b  # (out, r0 + sum of ranks[, 1..])
    step = {"t": float(t), "experts": experts[parts[0][0]]}  # the first part's (the denoiser's)
    metadata = {"format": "pt", "tsm_spec": spec.to_json(), "tsm_step": json.dumps(step)}
    if isinstance(models, Mapping):
        metadata["tsm_components"] = json.dumps([head for head, _ in parts])
    return tensors, metadata


def export_step_lora(models: Models, t: float, path: PathLike, prefix: str | None = None) -> Path:
    """Write the LoRA a sampling step at timestep ``t`` (in [0, T]) uses, as one diffusers/PEFT LoRA file.

    Fostered experts: the core expert of t. Assembled with a timestep-only router (``router="t_only"``): the
    core and every context expert of t, weighted by its gate E[t], stacked into one LoRA of their summed
    rank -- exactly the layer's update at t. A gate that reads the layer's input (F(z)) makes the update
    non-linear in the input, so it cannot be written as a LoRA: that is refused. Fuse the file into the
    base weights (``pipe.fuse_lora()``) and a step costs what a base-model step costs. Variants: a shared
    expert is stacked in front (rank r0 + r); smooth routing writes both blended experts of t, weighted; a
    rank factor (modulation, rank schedule) writes A and B diag(d(t)), d(t) at t.
    ``models``: one model, or {component: model} (the text encoders' LoRA at the same t goes in too).
    """
    tensors, metadata = step_lora_state(models, t, prefix)
    return _atomic_save(tensors, path, metadata)


def _strip_component(keys: list[str], prefix: str | None, model: nn.Module) -> dict[str, str]:
    """Map each LoRA key to its module-relative name, keeping only the keys of our pipeline component.

    ``prefix`` None: a LoRA whose keys start with pipeline components (``unet.``, ``text_encoder.``...) gives
    the keys of `default_prefix`; an unprefixed one (PEFT's files, ``unet.save_lora_adapter``) is taken whole.
    """
    names = {k: k.removeprefix(PEFT_PREFIX) for k in keys}
    components = {n.split(".", 1)[0] for n in names.values()} & set(COMPONENTS)
    if prefix == "" or (prefix is None and not components):
        return names
    if prefix is None:
        prefix, known = _known_prefix(model)
        alike = sorted(c for c in components if _same_kind(c, prefix)) if prefix else []
        if not known and len(alike) > 1:  # e.g. text_encoder and text_encoder_2 keys for a bare CLIP model
            raise TsmError(
                f"the LoRA has keys of {', '.join(alike)} and nothing says which one {type(model).__name__} is; "
                "pass prefix= to pick its component"
            )
    ours = {k: n.removeprefix(f"{prefix}.") for k, n in names.items() if n.startswith(f"{prefix}.")}
    if not ours:
        has = f"keys of {_few(components)}" if components else "unprefixed keys"
        raise TsmError(
            f"the LoRA has {has}, none with prefix {prefix!r} for {type(model).__name__}; "
            "pass prefix= to pick its component"
        )
    return ours


def import_lora(
    model: nn.Module,
    lora: Mapping[str, torch.Tensor] | PathLike,
    scale: int | None = None,
    index: int | None = None,
    prefix: str | None = None,
    component: str | None = None,
) -> dict[str, list[str]]:
    """Start experts from an existing LoRA (a dict of tensors, or a safetensors path); returns a summary.

    Keys are PEFT/diffusers names (``{module}.lora_A.weight``, ``lora_B.weight``, optional ``{module}.alpha``)
    or kohya's ``lora_down``/``lora_up``; a leading ``base_model.model.`` and the component prefix
    (``unet.``...) are stripped. B is rescaled so that each expert's s * B A equals the source's
    (alpha / r) * B A (no alpha: 1.0, the diffusers convention). All experts get the LoRA by default, or the
    experts of ``scale``, or the one expert (``scale``, ``index``). Our layers that the LoRA does not cover
    are left as they are and listed under "missing"; the ones set are under "loaded". Wan LoRAs in Wan's
    original names (``diffusion_model.blocks.N.self_attn.q.lora_A.weight``: ai-toolkit's files, ComfyUI's;
    ``lora_unet_blocks_N_self_attn_q.lora_down.weight``: musubi-tuner's) are converted with diffusers' own
    ``WanPipeline.lora_state_dict``. ``component``: the pipeline part ``model`` is (Wan 2.2: ``transformer`` or
    ``transformer_2``); a tsm file exported for the other one is refused.
    """
    spec = get_routing(model).spec
    keys = _expert_keys(spec, scale, index)
    if isinstance(lora, Mapping):
        tensors = dict(lora)
    else:
        metadata, tensors = _open(lora, read_tensors=True)
        check_component(metadata, component, lora)
    if tensors and all(k.startswith(WAN_HEADS) for k in tensors):  # Wan's original names (ai-toolkit, musubi)
        tensors = _from_wan(tensors)
    if tensors and all(k.startswith(KOHYA_HEADS) for k in tensors):
        tensors = _from_kohya(tensors)
    names = _strip_component(list(tensors), prefix, model)

    modules: dict[str, dict[str, torch.Tensor]] = {}  # module name -> {"A", "B", "alpha"}
    for key, name in names.items():
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise TsmError(
                f"unsupported LoRA key {key!r}: only lora_A/lora_B (or lora_down/lora_up) weights and alpha "
                "can become experts (no DoRA, no LoRA bias)"
            )
        modules.setdefault(name.removesuffix(suffix), {})[LORA_SUFFIXES[suffix]] = tensors[key]

    layers = dict(expert_layers(model))
    unknown = modules.keys() - layers.keys()
    if unknown:
        raise TsmError(
            f"LoRA modules match no expert layer of {type(model).__name__}: {_few(unknown)}; "
            "add them to the spec's targets, or pass prefix="
        )
    for name, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise TsmError(f"LoRA module {name} has no {'lora_A' if 'A' not in parts else 'lora_B'} weight")
        rank = parts["A"].shape[0]
        if rank != spec.rank:
            raise TsmError(
                f"LoRA rank {rank} != the experts' rank {spec.rank} ({name}); add experts with rank={rank}"
            )

    weights = {}  # module -> (A, B) in our shapes, B rescaled; all checked before anything is copied
    for name, parts in modules.items():
        layer = layers[name]
        src_scale = float(parts["alpha"]) / spec.rank if "alpha" in parts else 1.0
        a = _fit(parts["A"], layer.lora_A[keys[0]], name, "lora_A")
        b = _fit(parts["B"], layer.lora_B[keys[0]], name, "lora_B") * (src_scale / layer.scaling)
        weights[name] = a, b

    for layer in layers.values():
        layer.unmerge()  # a merged base weight would keep the old expert
    with torch.no_grad():
        for name, (a, b) in weights.items():
            for key in keys:
                layers[name].lora_A[key].copy_(a)
                layers[name].lora_B[key].copy_(b)
    return {"loaded": sorted(modules), "missing": sorted(layers.keys() - modules.keys())}


KOHYA_HEADS = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # what diffusers' kohya detection reads
WAN_HEADS = (
    "diffusion_model.blocks.",
    "lora_unet_blocks_",
)  # Wan's original names: ai-toolkit/ComfyUI, musubi


# musubi-tuner names Wan's modules kohya-style: "lora_unet." + the module's name, dots made underscores
# (blocks.3.cross_attn.k -> lora_unet_blocks_3_cross_attn_k, blocks.3.ffn.0 -> lora_unet_blocks_3_ffn_0)
MUSUBI_WAN = re.compile(r"lora_unet_blocks_(\d+)_(self_attn|cross_attn|ffn)_(\w+)")


def _musubi_to_wan(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """musubi-tuner's Wan keys (``lora_unet_blocks_N_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha``) in Wan's original names (``diffusion_model.blocks.N.self_attn.q.lora_down.weight``).

    Why not diffusers' musubi converter: it pops every block's self-attention, cross-attention and FFN keys and
    their alphas unconditionally, so a LoRA trained on some layers only (attention only, a few blocks, no alpha)
    fails with a KeyError. Its converter for Wan's original names takes any subset with or without alpha, so
    the names are mapped to those and that converter does the rest (alpha folding included)."""
    out = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        match = MUSUBI_WAN.fullmatch(module)
        if match is None:
            raise TsmError(
                f"unsupported musubi-tuner Wan LoRA key {key!r}: expected lora_unet_blocks_N_self_attn_*, "
                "_cross_attn_* or _ffn_* modules"
            )
        block, part, leaf = match.groups()
        out[f"diffusion_model.blocks.{block}.{part}.{leaf}.{suffix}"] = value
    return out


def _from_wan(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Wan LoRA in Wan's original names as diffusers keys (``transformer.blocks.N.attn1.to_q.lora_A.weight``),
    alpha folded in, by diffusers' converter (``WanPipeline.lora_state_dict``); musubi-tuner's names first
    become Wan's (`_musubi_to_wan`)."""
    from diffusers import WanPipeline

    if all(k.startswith("lora_unet_") for k in tensors):
        tensors = _musubi_to_wan(tensors)
    try:
        return dict(WanPipeline.lora_state_dict(dict(tensors)))
    except (ValueError, KeyError) as e:
        raise TsmError(f"cannot convert the Wan LoRA: {str(e).strip().splitlines()[0]}") from None


def _from_kohya(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya LoRA (``lora_unet_…``, ``lora_te…``) as PEFT keys with the component prefix, alpha folded into B.

    The names are diffusers' own conversion (``StableDiffusionPipeline.lora_state_dict``, then
    ``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft``); alpha is applied here per module
    (B * alpha / r) because the converter's alpha names miss the attention layers.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    scaled = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        if suffix == "lora_up.weight" and f"{module}.alpha" in tensors:
            rank = tensors[f"{module}.lora_down.weight"].shape[0]
            value = value * (float(tensors[f"{module}.alpha"]) / rank)
        scaled[key] = value
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(scaled)
    except ValueError as e:
        raise TsmError(f"cannot convert the kohya LoRA: {str(e).strip().splitlines()[0]}") from None
    unet = convert_unet_state_dict_to_peft({k: v for k, v in converted.items() if k.startswith("unet.")})
    text = {k: v for k, v in converted.items() if not k.startswith("unet.")}
    for kind in (StateDictType.DIFFUSERS_OLD, StateDictType.DIFFUSERS):  # attention, then fc1/fc2 names
        text = convert_state_dict_to_peft(text, kind)
    out = {**unet, **text}
    # kohya names keep CLIP's text_model. level, which transformers >= 5 no longer has
    return {
        k.replace(".text_model.", ".", 1) if k.startswith("text_encoder") else k: v for k, v in out.items()
    }


def _fit(src: torch.Tensor, ours: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """``src`` as float32 in the shape of ``ours``; trailing 1x1 kernel dims may be absent in the source."""
    same_core = src.shape[:2] == ours.shape[:2] and src.numel() == ours.numel()
    if src.shape != ours.shape and not same_core:
        raise TsmError(
            f"LoRA {what} of {name} has shape {tuple(src.shape)}, the experts need {tuple(ours.shape)}"
        )
    return src.detach().to(torch.float32).reshape(ours.shape)


# ----------------------------------------------------------------------------------------------------
# per-step switching in a diffusers pipeline
# ----------------------------------------------------------------------------------------------------
def _encoded(
    pipeline: object, prompt: object, negative_prompt: object, n: int, extra: Mapping[str, object]
) -> dict[str, torch.Tensor]:
    """The prompt tensors the pipeline's denoising loop reads, encoded again with the text adapters now set:
    [negative; positive] under guidance, as each pipeline's ``__call__`` concatenates them before its loop."""
    inputs = set(getattr(pipeline, "_callback_tensor_inputs", ()))
    cfg = bool(pipeline.do_classifier_free_guidance)
    kw = {
        "device": pipeline._execution_device,
        "num_images_per_prompt": n,
        "do_classifier_free_guidance": cfg,
        "negative_prompt": negative_prompt,
        "clip_skip": getattr(pipeline, "clip_skip", None),
        **extra,
    }

    def both(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return torch.cat([neg, pos]) if cfg else pos

    if "add_text_embeds" in inputs:  # SDXL: (B, L, 2048) hidden states and (B, 1280) pooled
        pos, neg, pooled, neg_pooled = pipeline.encode_prompt(prompt, **kw)
        return {"prompt_embeds": both(pos, neg), "add_text_embeds": both(pooled, neg_pooled)}
    if "pooled_prompt_embeds" in inputs:  # SD3: CLIP + T5 tokens and both CLIPs' pooled vectors
        pos, neg, pooled, neg_pooled = pipeline.encode_prompt(prompt, None, None, **kw)
        return {"prompt_embeds": both(pos, neg), "pooled_prompt_embeds": both(pooled, neg_pooled)}
    if {"prompt_embeds", "negative_prompt_embeds"} <= inputs:  # SD 1.x / 2.x
        pos, neg = pipeline.encode_prompt(prompt, **kw)
        return {"prompt_embeds": both(pos, neg)}
    raise TsmError(
        f"{type(pipeline).__name__} does not let a step callback replace its prompt embeddings; per-step text "
        "experts work with the SD 1.x/2.x, SDXL and SD3 pipelines (export the denoiser alone for the others)"
    )


def expert_switch_callback(
    pipe: object,
    adapters: Iterable[str],
    spec: ExpertSpec,
    num_inference_steps: int | None = None,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    num_images_per_prompt: int = 1,
    encode_kwargs: Mapping[str, object] | None = None,
) -> object:
    """A ``callback_on_step_end`` that switches the pipeline's LoRA adapter to the expert of each step's t.

    ``adapters``: the adapter names of the finest scale's experts, interval 0 (lowest t) first, loaded with
    ``pipe.load_lora_weights(path, adapter_name=name)``. The callback runs after step i, so it sets the expert
    of step i + 1 (``pipe.scheduler.timesteps[i + 1]``). The first step's expert is set here, before the call:
    that of ``timesteps[0]`` when ``num_inference_steps`` is given (the scheduler is set to that many steps, as
    the pipeline will set it), else the expert of the highest t, where text-to-image sampling starts. Make one
    callback per pipeline call: it follows the adapter it set last.

    Text-encoder experts (files from ``tsm export RUN --all`` hold them next to the denoiser's): the pipeline
    encodes the prompt once, before its loop, so the callback encodes it again whenever the interval changes
    and hands the loop the new embeddings (``prompt_embeds``, and SDXL's ``add_text_embeds`` / SD3's
    ``pooled_prompt_embeds``; a pipeline takes them back from any callback's return). Pass the call's
    ``prompt``, ``negative_prompt`` and ``num_images_per_prompt`` here too, and in ``encode_kwargs`` any other
    argument the call gives its ``encode_prompt`` (SD3: ``max_sequence_length``). That is what ``tsm sample``
    does: each interval's text expert encodes the prompt its denoiser steps see. Measured on tiny pipelines with
    experts on the denoiser and both CLIP encoders, 6 steps over 4 intervals, max |callback - tsm sample|:
    SDXL 2e-4/255 (tests/test_export_text.py), SD3 2e-4/255; switching adapters without re-encoding leaves
    the first interval's text expert on: 4.6/255 (SDXL), 18.5/255 (SD3).
    """
    adapters = list(adapters)
    n = spec.experts_per_scale[0]
    if len(adapters) != n:
        raise TsmError(f"the finest scale has {n} experts; pass {n} adapter names, got {len(adapters)}")
    listed = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else {}
    texts = sorted(
        k for k, names in listed.items() if k.startswith("text_encoder") and set(names) & set(adapters)
    )
    if texts and prompt is None:
        raise TsmError(
            f"the adapters hold {', '.join(texts)} experts too; pass prompt= (and negative_prompt=, "
            "num_images_per_prompt= as in the pipeline call) so each interval's text expert encodes it"
        )

    def expert_of(t: object) -> str:
        return adapters[int(expert_index(torch.as_tensor(float(t)), spec.scales[0], spec.num_timesteps))]

    if num_inference_steps is not None:
        pipe.scheduler.set_timesteps(num_inference_steps)
        current = [expert_of(pipe.scheduler.timesteps[0])]
    else:
        current = [adapters[-1]]
    pipe.set_adapters(current[0])  # before the call: the pipeline encodes the prompt with this text expert

    def callback(pipeline: object, i: int, t: object, kwargs: dict) -> dict:
        timesteps = pipeline.scheduler.timesteps
        if i + 1 < len(timesteps) and expert_of(timesteps[i + 1]) != current[0]:
            current[0] = expert_of(timesteps[i + 1])
            pipeline.set_adapters(current[0])
            if texts:  # the new interval's text expert encodes the prompt the next steps see
                new = _encoded(pipeline, prompt, negative_prompt, num_images_per_prompt, encode_kwargs or {})
                kwargs = {**kwargs, **new}
        return kwargs

    return callback
