"""Frozen text encoders: each caption is encoded once and cached on disk; the run's weights do not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import write_tiny_model

from tsm.cli import main
from tsm.data import write_digits_image_folder
from tsm.models.sd15 import SD15


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("textcache")
    return {
        "sd15": write_tiny_model("sd15", root / "sd15"),
        "images": write_digits_image_folder(root / "i", n=6, size=16),
    }


def run(tmp_path: Path, assets: dict, name: str, cache_dir: Path, cache: bool = True) -> dict:
    cfg = {
        "model": {"family": "sd15", "path": str(assets["sd15"])},
        "experts": {"scales": [2, 1], "rank": 2, "text_targets": []},  # frozen text encoder
        "data": {"path": str(assets["images"]), "resolution": 16, "cache": cache, "cache_dir": str(cache_dir)},
        "optim": {"lr": 1e-3},
        "train": {"steps": 4, "batch_size": 4, "output_dir": str(tmp_path / name), "validation_prompts": [],
                  "log_with": "none"},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return load_file(tmp_path / name / "unet.safetensors")


def test_captions_are_encoded_once_and_the_weights_stay_the_same(assets, tmp_path, monkeypatch):
    encoded: list[str] = []
    original = SD15.encode_prompt

    def counting(self, c, captions):
        encoded.extend(captions)
        return original(self, c, captions)

    monkeypatch.setattr(SD15, "encode_prompt", counting)
    first = run(tmp_path, assets, "first", tmp_path / "cache")
    assert 0 < len(encoded) == len(set(encoded)) <= 6  # 16 samples, each caption encoded once
    encoded.clear()
    second = run(tmp_path, assets, "second", tmp_path / "cache")
    assert encoded == []  # every caption from the cache
    uncached = run(tmp_path, assets, "uncached", tmp_path / "none", cache=False)
    assert len(encoded) == 16  # no cache: every sample encoded
    for k in first:
        torch.testing.assert_close(first[k], second[k], atol=0, rtol=0)
        torch.testing.assert_close(first[k], uncached[k], atol=1e-6, rtol=1e-5)
