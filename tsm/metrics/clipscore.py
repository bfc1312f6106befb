"""CLIPScore as torchmetrics defines it, and EvalCrafter's CLIP-Temp for clips.

CLIPScore (Hessel et al. 2021; torchmetrics ``functional.multimodal.clip_score``): 100 * cos(E_image,
E_text) per image, with `CLIPModel`'s projected features and its processor (images resized and cropped by the
processor; text padded, cut at the text model's positions as torchmetrics cuts it); the score is
max(mean over images, 0) — torchmetrics clamps the mean, not each image. Default model
``openai/clip-vit-large-patch14``, torchmetrics' default.

A clip (``frames=F``: the image is F frames side by side, as `tsm sample` writes clips): its CLIPScore is the
mean of its frames' (EvalCrafter's ``clip_score``, here on torchmetrics' 0-100 scale), and its CLIP-Temp
the mean cosine of consecutive frames' image features (EvalCrafter's ``clip_temp_score``). EvalCrafter itself
feeds raw 0-255 pixels resized to 224 to ``clip-vit-base-patch32`` without CLIP's normalisation; here the
frames go through the model's own processor, so CLIP-Temp is comparable across models but not digit for digit
with EvalCrafter's table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tsm.metrics.folder import Item, ScoreCache, load_pretrained, open_rgb, split_frames, text_key

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object with the projection in pooler_output; 4.x returns the tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


class Clip:
    """A `CLIPModel` and its processor: unit-norm image and text features."""

    def __init__(self, model_id: str = DEFAULT_MODEL, device: Any = "cpu") -> None:
        from transformers import CLIPModel

        self.model, self.processor, self.revision = load_pretrained(
            model_id, CLIPModel, "clip", "CLIP model", DEFAULT_MODEL, device
        )
        self.model_id, self.device = model_id, device

    def settings(self) -> dict[str, Any]:
        return {"model": self.model_id, "revision": self.revision}

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D), unit norm."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        f = _features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu()
        return f / f.norm(p=2, dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D), unit norm; token ids past the text model's positions are cut off, as torchmetrics does."""
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True)
        limit = self.model.config.text_config.max_position_embeddings
        ids, mask = tokens["input_ids"][:, :limit], tokens["attention_mask"][:, :limit]
        f = _features(
            self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        )
        f = f.float().cpu()
        return f / f.norm(p=2, dim=-1, keepdim=True)


def clip_score(
    items: Sequence[Item],
    model: Clip,
    frames: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """CLIPScore of images ``items`` against their prompts (per image, and max(mean, 0)); with ``frames``, each
    image is a clip: per-frame CLIPScore averaged per clip, and CLIP-Temp. Image features are cached by content."""
    settings = {**model.settings(), "frames": frames}
    cache = ScoreCache("clip", {"model": model.model_id, "revision": model.revision})
    n = frames or 1

    def frame_keys(item: Item) -> list[str]:
        return [item.key] if frames is None else [text_key(item.key, f"frame {k}/{n}") for k in range(n)]

    todo = [item for item in items if any(k not in cache for k in frame_keys(item))]
    bar = tqdm(total=len(todo), desc="CLIPScore", unit="image", disable=not progress or not todo)
    per_batch = max(1, batch_size // n)
    for start in range(0, len(todo), per_batch):
        batch = todo[start : start + per_batch]
        tiles = [
            t
            for item in batch
            for t in (split_frames(open_rgb(item.path), n) if frames else [open_rgb(item.path)])
        ]
        features = model.image_features(tiles)  # (B * F, D)
        keys = [k for item in batch for k in frame_keys(item)]
        cache.add({k: features[j] for j, k in enumerate(keys)})
        bar.update(len(batch))
    bar.close()

    prompts = sorted({item.prompt or "" for item in items})
    text = dict(zip(prompts, model.text_features(prompts), strict=True)) if prompts else {}
    per_image, temps = [], []
    for item in items:
        image = torch.stack([cache[k] for k in frame_keys(item)])  # (F, D), unit norm
        cos = image @ text[item.prompt or ""]  # (F,)
        row = {"file": str(item.path), "prompt": item.prompt, "score": float(100 * cos.mean())}
        if frames is not None and n > 1:
            row["clip_temp"] = float((image[:-1] * image[1:]).sum(-1).mean())  # consecutive frames' cosine
            temps.append(row["clip_temp"])
        per_image.append(row)
    result = {
        "metric": "clipscore",
        "score": max(float(np.mean([r["score"] for r in per_image])), 0.0),
        "images": len(items),
        **settings,
        "per_image": per_image,
    }
    if temps:
        result["clip_temp"] = float(np.mean(temps))
    return result
