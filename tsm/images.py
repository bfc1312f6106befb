"""Image files: tensors in [-1, 1] to PNG files and labelled grids (PIL only; no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image; a clip (3, F, H, W) becomes its frames side by side."""
    if image.dim() == 4:
        image = torch.cat(list(image.unbind(1)), dim=-1)  # (3, H, F*W)
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def make_grid(tiles: list[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Tiles row by row, ``pad`` pixels of white between them. All tiles share the first tile's size."""
    w, h = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w + (columns - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % columns) * (w + pad), (k // columns) * (h + pad)))
    return grid


def grid_tile(grid: Image.Image, k: int, columns: int, size: tuple[int, int], pad: int = 2) -> Image.Image:
    """Crop tile k back out of a grid made by `make_grid`."""
    w, h = size
    x, y = (k % columns) * (w + pad), (k // columns) * (h + pad)
    return grid.crop((x, y, x + w, y + h))


def save_images(images: torch.Tensor, directory: str | Path, names: list[str], columns: int) -> Path:
    """Write one PNG per image and ``grid.png``; returns the grid's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiles = [to_pil(img) for img in images]
    for tile, name in zip(tiles, names, strict=True):
        tile.save(directory / f"{name}.png")
    grid_path = directory / "grid.png"
    make_grid(tiles, columns).save(grid_path)
    return grid_path
