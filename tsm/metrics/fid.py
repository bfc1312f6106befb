"""FID and Patch-FID on the FID Inception-v3's pool3 features (`tsm.metrics.inception`).

FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to the 2048-d features of two image
sets, computed as pytorch-fid's ``calculate_frechet_distance`` computes it (scipy's ``sqrtm``; when the
product of the covariances is singular, 1e-6 on both diagonals; an imaginary part above 1e-3 is an error).
Features as torch-fidelity extracts them: the uint8 image at its own size, resized to 299x299 inside the
network by TensorFlow 1.x's bilinear rule.

Patch-FID: the same distance on one 299x299 crop of each image at full resolution (no resize), the centre
crop, so that detail lost by the downsampling to 299 counts (the rule of SDXL-Lightning's FID-Patch). An image
with a side under 299 pixels has no such crop: one line, use FID.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tsm.errors import TsmError
from tsm.metrics.folder import Item, ScoreCache, model_revision, open_rgb, text_key
from tsm.metrics.inception import FEATURES, INPUT_SIZE, load_fid_inception, prepare

EPS = 1e-6  # pytorch-fid's


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,) and covariance (D, D), float64, as pytorch-fid (``np.cov(rowvar=False)``)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():  # "matrix is singular": handled by the caller's eps route, as pytorch-fid
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(matrix)
    return root[0] if isinstance(root, tuple) else root  # scipy < 1.16 with disp=False returns (root, error)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = EPS
) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2), pytorch-fid's ``calculate_frechet_distance``."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise TsmError(f"feature statistics of different sizes: {mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # a singular product: nudge both diagonals, as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise TsmError(
                f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm; too few images?"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def centre_crop(image: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """The centre ``size`` x ``size`` crop (Patch-FID's patch); the image must be at least that large."""
    w, h = image.size
    if min(w, h) < size:
        raise TsmError(
            f"Patch-FID crops {size}x{size} at full resolution; an image is {w}x{h}: use --metric fid"
        )
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


class InceptionFeatures:
    """The FID Inception-v3 with a weights file; pool3 features of image files, cached by content."""

    def __init__(self, weights: str | Path, device: Any = "cpu") -> None:
        self.net = load_fid_inception(weights, device)
        self.weights, self.device = str(weights), device
        self.revision = model_revision(str(weights), None)

    def settings(self) -> dict[str, Any]:
        return {"model": self.weights, "revision": self.revision, "resize": "TensorFlow 1.x bilinear to 299"}

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 2048) float32. Each image is resized on its own (sizes may differ), then they go through as one batch."""
        x = torch.cat([prepare(_uint8(im)[None].to(self.device)) for im in images])  # (N, 3, 299, 299)
        return self.net(x).float().cpu()

    def of(
        self, items: Sequence[Item], patch: bool, batch_size: int, progress: bool, desc: str
    ) -> np.ndarray:
        cache = ScoreCache("inception", self.settings())
        keys = [text_key(item.key, "patch") if patch else item.key for item in items]
        todo = [k for k, key in enumerate(keys) if key not in cache]
        bar = tqdm(total=len(todo), desc=desc, unit="image", disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [open_rgb(items[k].path) for k in batch]
            f = self.features([centre_crop(im) for im in images] if patch else images)
            cache.add({keys[k]: f[j] for j, k in enumerate(batch)})
            bar.update(len(batch))
        bar.close()
        out = np.stack([cache[key].numpy() for key in keys]) if keys else np.zeros((0, FEATURES))
        return out.astype(np.float64)


def fid(
    items: Sequence[Item],
    reference: Sequence[Item],
    model: InceptionFeatures,
    patch: bool = False,
    batch_size: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """FID (or Patch-FID) of ``items`` against ``reference``; at least 2 images on each side."""
    name = "Patch-FID" if patch else "FID"
    for what, group in (("images", items), ("reference images", reference)):
        if len(group) < 2:
            raise TsmError(
                f"{name} needs at least 2 {what} (a covariance), got {len(group)}; 10,000+ for a stable value"
            )
    a = model.of(items, patch, batch_size, progress, f"{name} (images)")
    b = model.of(reference, patch, batch_size, progress, f"{name} (reference)")
    distance = frechet_distance(*statistics(a), *statistics(b))
    return {
        "metric": "patch-fid" if patch else "fid",
        "score": distance,
        "images": len(items),
        "reference_images": len(reference),
        **model.settings(),
        "crop": f"centre {INPUT_SIZE}x{INPUT_SIZE} at full resolution" if patch else None,
        "per_image": [{"file": str(item.path), "prompt": item.prompt} for item in items],
    }
