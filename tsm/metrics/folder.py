"""Which images of a folder to score and their prompts; per-image results cached by the file's content.

Prompts come from the conventions of the data folders ([docs/data.md]): an image's ``.txt`` sidecar, else its
``metadata.jsonl`` line; a ``prompts.json`` (file name -> prompt, what `tsm sample` writes) counts too, and the
``grid.png`` beside it is not an image to score. Hidden folders (``.cache``) are skipped.

`ScoreCache` keeps what a metric computed per image (a probability, a feature vector) in chunk files under
``user_cache_dir()/eval/<metric>-<settings hash>/``, keyed by the sha256 of the image file (and of the text it
was scored against), so an interrupted evaluation resumes where it stopped and the same image in another folder
is not scored twice. The settings hash covers the model id and revision and every setting that changes a value.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from tsm.data import IMAGE_EXTS, _read_caption, _read_metadata, _walk, user_cache_dir
from tsm.errors import TsmError, shorten
from tsm.io import _atomic_save, write_text_atomic

SAMPLE_PROMPTS = "prompts.json"  # tsm sample: {"p00_seed0": "a red car", ...}
SAMPLE_GRID = "grid.png"


@dataclass(frozen=True)
class Item:
    path: Path
    prompt: str | None  # None when the folder gives it none (fine for FID)
    key: str  # sha256 of the file's bytes


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_key(*parts: str) -> str:
    """A key for (image, text) pairs: the image key and the text, hashed (safetensors keys stay short)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _sample_prompts(folder: Path) -> dict[Path, str]:
    path = folder / SAMPLE_PROMPTS
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TsmError(f"{path} is not a JSON object of file name -> prompt; fix or delete it") from None
    if not isinstance(names, dict):
        raise TsmError(f"{path} is not a JSON object of file name -> prompt; fix or delete it")
    out = {}
    for name, prompt in names.items():
        stem = folder / str(name)
        for ext in ("", *IMAGE_EXTS):
            out[Path(f"{stem}{ext}").resolve()] = str(prompt)
    return out


def scan(root: str | Path, need_prompts: bool) -> list[Item]:
    """The images below ``root`` in a stable order, with their prompts; with ``need_prompts`` an image without
    one is an error (one line, naming the first)."""
    root = Path(root)
    if not root.is_dir():
        raise TsmError(f"{root} is not a folder of images")
    metadata = _read_metadata(root)
    items, missing = [], []
    for folder, _, files in _walk(root):
        sampled = _sample_prompts(folder) if SAMPLE_PROMPTS in files else {}
        for name in files:
            if not name.lower().endswith(IMAGE_EXTS) or (sampled and name == SAMPLE_GRID):
                continue
            path = folder / name
            prompt = _read_caption([path.with_suffix(".txt")], path, metadata)
            if prompt is None:
                prompt = sampled.get(path.resolve())
            if prompt is None:
                missing.append(path)
            items.append(Item(path, prompt, content_key(path.read_bytes())))
    if not items:
        raise TsmError(f"{root} holds no images ({', '.join(IMAGE_EXTS)})")
    if need_prompts and missing:
        first = missing[0].relative_to(root)
        raise TsmError(
            f"{len(missing)} of {len(items)} images in {root} have no prompt (e.g. {first}); give each a .txt "
            f'sidecar ({first.with_suffix(".txt")}) or a metadata.jsonl line {{"file_name": "{first}", "text": ...}}'
        )
    return items


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise TsmError(f"cannot read image {path} ({type(e).__name__}); delete or replace it") from None


def split_frames(image: Image.Image, frames: int) -> list[Image.Image]:
    """A clip as `tsm sample` writes it (its frames side by side) -> its ``frames`` frames."""
    width, height = image.size
    if frames < 1 or width % frames:
        raise TsmError(f"an image {width} pixels wide does not split into --frames {frames} equal frames")
    w = width // frames
    return [image.crop((k * w, 0, (k + 1) * w, height)) for k in range(frames)]


def model_revision(model_id: str, config: Any) -> str | None:
    """The hub commit a model was loaded from; for a local folder, a fingerprint of its files (name, size,
    mtime), so that cached values are not reused after the weights change."""
    path = Path(model_id)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stats = [
            (str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in files
        ]
        return "local:" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
    return getattr(config, "_commit_hash", None)


# ---------------------------------------------------------------------------------------------------------
# the per-image cache
# ---------------------------------------------------------------------------------------------------------
class ScoreCache:
    """Tensors by key, for one metric and one set of settings; written a chunk file at a time, atomically, so
    an interrupted run loses at most the batch it was scoring."""

    def __init__(self, metric: str, settings: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.directory = user_cache_dir() / "eval" / f"{metric}-{digest}"
        self.values: dict[str, torch.Tensor] = {}
        if self.directory.is_dir():
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            for chunk in sorted(self.directory.glob("chunk_*.safetensors")):
                try:
                    self.values.update(load_file(str(chunk)))
                except (SafetensorError, OSError):  # a chunk cut short by a full disk: score those again
                    continue

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.values[key]

    def add(self, values: dict[str, torch.Tensor]) -> None:
        if not values:
            return
        values = {k: v.detach().float().cpu() for k, v in values.items()}
        _atomic_save(values, self.directory / f"chunk_{uuid.uuid4().hex}.safetensors", {})
        self.values.update(values)


def write_result(root: str | Path, metric: str, result: dict[str, Any]) -> Path:
    """``root/eval_<metric>.json``, written whole or not at all."""
    return write_text_atomic(Path(root) / f"eval_{metric}.json", json.dumps(result, indent=2))


def load_pretrained(
    model_id: str, model_class: type, model_type: str, what: str, example: str, device: Any
) -> tuple:
    """(model in eval mode on ``device``, its processor, its revision) for a transformers checkpoint that must
    be ``model_class``: anything else (a captioning BLIP for a VQA one, a BLIP for a CLIP) is one line."""
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise TsmError(
            f"cannot load {what} {shorten(model_id)!r} ({type(e).__name__}); pass a local folder or a hub id such "
            f"as {example} (a hub id downloads once, then loads from the hub cache)"
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type != model_type or (archs and model_class.__name__ not in archs):
        raise TsmError(
            f"{shorten(model_id)} is not a {what} (its config: model_type {config.model_type!r}, architectures "
            f"{archs}); pass a {model_class.__name__} checkpoint such as {example}"
        )
    model = model_class.from_pretrained(model_id)
    processor = AutoProcessor.from_pretrained(model_id)
    return model.eval().requires_grad_(False).to(device), processor, model_revision(model_id, config)
