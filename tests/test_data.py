"""Image/video folders, captions, crops by value, caption dropout, errors, the latent cache, digits."""

import hashlib
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tsm.data import (
    CaptionedImageFolder,
    LatentCache,
    VideoClipFolder,
    cached_latent_dist,
    collate,
    text_cache_tag,
    write_digits_image_folder,
)
from tsm.errors import TsmError


def gray(level: float) -> float:
    """A uint8 gray level as the dataset's [-1, 1] value."""
    return level / 127.5 - 1.0


def column_ramp(width: int, height: int) -> Image.Image:
    """Column x has gray level 2x: the value of a pixel says which source column it came from."""
    row = (np.arange(width) * 2).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2))


def save(image: Image.Image, path, caption: str | None = "a caption"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(TsmError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------
def test_photo_and_png_load_as_rgb_tensors_in_range(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = save(Image.fromarray(skimage_data.astronaut()), tmp_path / "astronaut.jpg", "an astronaut")
    save(Image.new("RGBA", (40, 30), (255, 0, 0, 128)), tmp_path / "sub" / "red.png", "red\n")
    save(Image.new("L", (30, 30), 200), tmp_path / "sub" / "gray.bmp", "gray")

    ds = CaptionedImageFolder(tmp_path, resolution=24)
    assert len(ds) == 3 and ds.captions == ["an astronaut", "gray", "red"]  # sorted walk, sidecars stripped
    for i in range(3):
        item = ds[i]
        assert item["pixels"].shape == (3, 24, 24) and item["pixels"].dtype == torch.float32
        assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
    item = ds[0]
    assert item["key"].startswith(hashlib.sha256(photo.read_bytes()).hexdigest() + ":")
    assert item["pixels"].std() > 0.2  # a real photo, not a flat image
    red = ds[2]["pixels"]
    assert torch.allclose(red[:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))


def test_metadata_jsonl_captions_and_sidecar_precedence(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "a.png", None)
    save(Image.new("RGB", (8, 8)), tmp_path / "sub" / "b.jpg", None)
    save(Image.new("RGB", (8, 8)), tmp_path / "c.webp", "from the sidecar")
    (tmp_path / ".hidden").mkdir()
    save(Image.new("RGB", (8, 8)), tmp_path / ".hidden" / "skipped.png", None)
    rows = [
        {"file_name": "a.png", "text": "from text"},
        {"file_name": "sub/b.jpg", "caption": "from caption"},
        {"file_name": "c.webp", "text": "ignored: the sidecar wins"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = CaptionedImageFolder(tmp_path, resolution=8)
    assert dict(zip([p.name for p in ds.paths], ds.captions, strict=True)) == {
        "a.png": "from text",
        "c.webp": "from the sidecar",
        "b.jpg": "from caption",
    }


def test_center_crop_takes_the_middle_columns(tmp_path):
    save(column_ramp(96, 64), tmp_path / "ramp.png")
    item = CaptionedImageFolder(tmp_path, resolution=64)[0]  # shorter side already 64: no resize
    expected = torch.tensor([gray(2 * (x + 16)) for x in range(64)])  # (96 - 64) / 2 = 16 columns cut left
    assert torch.allclose(item["pixels"][0, 10], expected, atol=1e-6)
    assert item["key"].endswith(":96x64+16+0/64")


def test_resize_makes_shorter_side_the_resolution(tmp_path):
    save(column_ramp(128, 64), tmp_path / "wide.png")
    item = CaptionedImageFolder(tmp_path, resolution=32)[0]
    assert item["pixels"].shape == (3, 32, 32) and item["key"].endswith(":64x32+16+0/32")
    row = item["pixels"][0, 16]
    assert (row[1:] >= row[:-1] - 1e-3).all()  # still a left-to-right ramp after resampling


def test_flip_mirrors_and_is_in_the_key(tmp_path):
    half_white = np.zeros((32, 32, 3), np.uint8)
    half_white[:, :16] = 255
    save(Image.fromarray(half_white), tmp_path / "half.png")
    ds = CaptionedImageFolder(tmp_path, resolution=32, random_flip=True)
    flips = []
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        flipped = item["key"].endswith("/flip")
        white, black = (slice(16, 32), slice(0, 16)) if flipped else (slice(0, 16), slice(16, 32))
        assert (item["pixels"][:, :, white] == 1).all() and (item["pixels"][:, :, black] == -1).all()
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_random_crop_is_a_window_of_the_source_and_reproducible(tmp_path):
    save(column_ramp(96, 64), tmp_path / "ramp.png")
    ds = CaptionedImageFolder(tmp_path, resolution=64, center_crop=False, seed=3)
    lefts = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        left = int(item["key"].split("+")[1])
        expected = torch.tensor([gray(2 * (x + left)) for x in range(64)])
        assert torch.allclose(item["pixels"][1, 0], expected, atol=1e-6)
        lefts.add(left)
    assert len(lefts) > 1
    again = CaptionedImageFolder(tmp_path, resolution=64, center_crop=False, seed=3)
    again.set_epoch(7)
    assert again[0]["key"] == item["key"] and torch.equal(again[0]["pixels"], item["pixels"])


def test_caption_dropout_rate_and_determinism(tmp_path):
    for i in range(20):
        save(Image.new("RGB", (4, 4)), tmp_path / f"{i:02d}.png", f"caption {i}")

    def dropped(seed: int, epoch: int, p: float = 0.3) -> list[bool]:
        ds = CaptionedImageFolder(tmp_path, resolution=4, caption_dropout=p, seed=seed)
        ds.set_epoch(epoch)
        return [ds.caption_at(i) == "" for i in range(len(ds))]

    draws = [d for epoch in range(100) for d in dropped(0, epoch)]  # 2000 draws
    assert 0.26 < np.mean(draws) < 0.34
    assert dropped(0, 5) == dropped(0, 5)  # same seed and epoch: same captions (resumable)
    assert dropped(0, 5) != dropped(0, 6) and dropped(0, 5) != dropped(1, 5)
    assert not any(dropped(0, 0, p=0.0)) and all(dropped(0, 0, p=1.0))
    ds = CaptionedImageFolder(tmp_path, resolution=4, caption_dropout=0.3)
    assert [ds[i]["caption"] for i in range(3)] == [ds.caption_at(i) for i in range(3)]


def test_collate_and_dataloader(tmp_path):
    for i in range(3):
        save(Image.new("RGB", (10, 8), (i * 50, 0, 0)), tmp_path / f"{i}.png", f"c{i}")
    ds = CaptionedImageFolder(tmp_path, resolution=8)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch["pixels"].shape == (3, 3, 8, 8)
    assert batch["captions"] == ["c0", "c1", "c2"] and len(set(batch["keys"])) == 3


# ----------------------------------------------------------------------------------------------------
# errors: one line, naming the file
# ----------------------------------------------------------------------------------------------------
def test_folder_errors(tmp_path):
    one_line_error("does not exist", CaptionedImageFolder, tmp_path / "nope", 8)
    (tmp_path / "notes.txt").write_text("no images here")
    msg = one_line_error("has no images", CaptionedImageFolder, tmp_path, 8)
    assert str(tmp_path) in msg
    one_line_error("caption_dropout", CaptionedImageFolder, tmp_path, 8, caption_dropout=1.5)


def test_image_without_caption_names_both_ways_to_give_one(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "sub" / "x.png", None)
    msg = one_line_error("has no caption", CaptionedImageFolder, tmp_path, 8)
    assert str(tmp_path / "sub" / "x.png") in msg and str(tmp_path / "sub" / "x.txt") in msg
    assert '"file_name": "sub/x.png"' in msg and "metadata.jsonl" in msg


def test_bad_metadata_line_names_file_and_line(tmp_path):
    save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{not json\n')
    msg = one_line_error("not valid JSON", CaptionedImageFolder, tmp_path, 8)
    assert f"{tmp_path / 'metadata.jsonl'}:2" in msg
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    one_line_error("metadata.jsonl:1 must look like", CaptionedImageFolder, tmp_path, 8)


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_corrupt_image_is_named_when_loaded(tmp_path, corruption):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible
    data = save(Image.fromarray(noise), tmp_path / "a_good.png").read_bytes()
    bad = tmp_path / "b_bad.png"
    bad.write_bytes(b"not an image at all" if corruption == "garbage" else data[: len(data) // 2])
    bad.with_suffix(".txt").write_text("broken")
    ds = CaptionedImageFolder(tmp_path, resolution=8)  # construction does not decode images
    ds[0]
    msg = one_line_error("cannot read image", ds.__getitem__, 1)
    assert str(bad) in msg and "replace or delete" in msg


# ----------------------------------------------------------------------------------------------------
# video
# ----------------------------------------------------------------------------------------------------
def write_frames(folder, levels, size=(24, 16)):
    folder.mkdir(parents=True)
    for i, level in enumerate(levels):  # not zero-padded: f10 must sort after f9
        Image.new("RGB", size, (level, level, level)).save(folder / f"f{i}.png")


def test_frame_folder_clips(tmp_path):
    write_frames(tmp_path / "walk", [10 * i for i in range(11)])
    (tmp_path / "walk" / "caption.txt").write_text("walking")
    write_frames(tmp_path / "nested" / "run", [0, 50, 100, 150, 200], size=(16, 24))
    (tmp_path / "nested" / "run.txt").write_text("running")
    ds = VideoClipFolder(tmp_path, resolution=8, num_frames=3)
    assert [p.name for p in ds.paths] == ["run", "walk"] and ds.captions == ["running", "walking"]
    run, walk = ds[0], ds[1]
    assert walk["pixels"].shape == (3, 3, 8, 8) and run["pixels"].shape == (3, 3, 8, 8)
    # evenly spaced from first to last: frames 0, 5, 10 and 0, 2, 4
    assert torch.allclose(walk["pixels"][0, :, 4, 4], torch.tensor([gray(0), gray(50), gray(100)]), atol=1e-6)
    assert torch.allclose(run["pixels"][0, :, 4, 4], torch.tensor([gray(0), gray(100), gray(200)]), atol=1e-6)
    assert walk["key"] != run["key"] and ":3f:" in walk["key"]
    assert collate([run, walk])["pixels"].shape == (2, 3, 3, 8, 8)


def test_clip_errors(tmp_path):
    write_frames(tmp_path / "short", [0, 1])
    (tmp_path / "short.txt").write_text("short")
    msg = one_line_error("has 2 frames, fewer than num_frames=3", VideoClipFolder, tmp_path, 8, 3)
    assert str(tmp_path / "short") in msg
    write_frames(tmp_path / "nocap", [0, 1, 2])
    one_line_error("clip .*nocap has no caption", VideoClipFolder, tmp_path, 8, 2)
    one_line_error("has no clips", VideoClipFolder, tmp_path / "short", 8, 2)  # frames at the root


def write_mp4(path, levels, size=32):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), level, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize("ext", ["mp4", "mkv"])  # mkv headers carry no frame count: counted by decoding
def test_video_file_clip(tmp_path, ext):
    write_mp4(tmp_path / f"ramp.{ext}", [20 * i for i in range(9)])
    (tmp_path / "ramp.txt").write_text("getting brighter")
    ds = VideoClipFolder(tmp_path, resolution=16, num_frames=3)
    item = ds[0]
    assert item["pixels"].shape == (3, 3, 16, 16) and item["caption"] == "getting brighter"
    means = item["pixels"].mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([gray(0), gray(80), gray(160)]), atol=0.06)  # lossy codec
    too_few = VideoClipFolder(tmp_path, resolution=16, num_frames=12)  # frames of a video: counted at load
    msg = one_line_error("has 9 frames, fewer than num_frames=12", too_few.__getitem__, 0)
    assert str(tmp_path / f"ramp.{ext}") in msg


def test_corrupt_mp4_is_named(tmp_path):
    pytest.importorskip("av")
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "bad.txt").write_text("bad")
    msg = one_line_error("cannot read video", VideoClipFolder(tmp_path, 8, 2).__getitem__, 0)
    assert str(tmp_path / "bad.mp4") in msg


def test_video_file_without_pyav_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "clip.txt").write_text("a clip")
    msg = one_line_error("PyAV is not installed", VideoClipFolder, tmp_path, 8, 2)
    assert str(tmp_path / "clip.mp4") in msg and "tsm[video]" in msg


# ----------------------------------------------------------------------------------------------------
# caches
# ----------------------------------------------------------------------------------------------------
def test_cache_roundtrip_and_keys(tmp_path):
    cache = LatentCache(tmp_path, "model-a")
    tensors = {"mean": torch.randn(4, 2, 2), "std": torch.rand(4, 2, 2)}
    assert cache.get("k", "vae") is None
    cache.put("k", "vae", tensors)
    got = cache.get("k", "vae")
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert cache.get("k", "other") is None and cache.get("k2", "vae") is None
    assert LatentCache(tmp_path, "model-b").get("k", "vae") is None
    assert (cache.hits, cache.misses) == (1, 3)
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic write left no temp file


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other entry"])
def test_corrupt_cache_file_is_a_miss_then_rewritten(tmp_path, damage):
    cache = LatentCache(tmp_path, "m")
    cache.put("k", "vae", {"mean": torch.ones(3)})
    path = cache.path("k", "vae")
    if damage == "garbage":
        path.write_bytes(b"\x80\x04 definitely not safetensors")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-4])
    else:  # a valid file written for another key, copied over this one
        cache.put("other", "vae", {"mean": torch.zeros(3)})
        path.write_bytes(cache.path("other", "vae").read_bytes())
    assert cache.get("k", "vae") is None
    cache.put("k", "vae", {"mean": torch.full((3,), 2.0)})
    assert torch.equal(cache.get("k", "vae")["mean"], torch.full((3,), 2.0))


class GaussianEncoder(torch.nn.Module):
    """Has AutoencoderKL's ``encode(x).latent_dist.mean / .std`` (importing diffusers alone takes ~10 s here)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 2, stride=2)
        self.batch_sizes = []

    def encode(self, x):
        self.batch_sizes.append(len(x))
        mean, logvar = self.conv(x).chunk(2, dim=1)  # (B, 4, h, w) each
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.exp(0.5 * logvar)))


def test_cached_latent_dist_encodes_only_misses(tmp_path):
    encoder = GaussianEncoder()

    def vae(x):
        dist = encoder.encode(x).latent_dist
        return dist.mean, dist.std

    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cache = LatentCache(tmp_path, "encoder")
    mean, std = cached_latent_dist(vae, pixels, ["a", "b"], cache)
    assert mean.shape == std.shape == (2, 4, 8, 8) and (std > 0).all()
    with torch.no_grad():
        dist = encoder.encode(pixels).latent_dist
    assert torch.equal(mean, dist.mean) and torch.equal(std, dist.std)
    encoder.batch_sizes.clear()
    mean2, std2 = cached_latent_dist(vae, pixels, ["a", "b"], cache)
    assert encoder.batch_sizes == [] and torch.equal(mean2, mean) and torch.equal(std2, std)
    cached_latent_dist(vae, pixels, ["a", "c"], cache)
    assert encoder.batch_sizes == [1]  # only the new item was encoded
    assert torch.equal(cached_latent_dist(vae, pixels, ["a", "b"], None)[0], mean)  # no cache: plain encode


def test_text_cache_tags_are_per_expert_and_model():
    tags = {text_cache_tag("a cat", e, "te") for e in (None, 0, 1, 2, (0, 3), (1, 3))}
    assert len(tags) == 6
    assert text_cache_tag("a cat", 1, "te") == text_cache_tag("a cat", 1, "te")
    assert text_cache_tag("a cat", 1, "te") != text_cache_tag("a dog", 1, "te")
    assert text_cache_tag("a cat", 1, "te") != text_cache_tag("a cat", 1, "te+other-experts")


# ----------------------------------------------------------------------------------------------------
# bundled digits
# ----------------------------------------------------------------------------------------------------
def test_digits_folder(tmp_path):
    pytest.importorskip("sklearn")
    root = write_digits_image_folder(tmp_path / "digits", n=12, size=16)
    ds = CaptionedImageFolder(root, resolution=16)
    assert len(ds) == 12 and ds.captions[:3] == [
        "a handwritten digit 0",
        "a handwritten digit 1",
        "a handwritten digit 2",
    ]
    pixels = ds[0]["pixels"]
    assert pixels.shape == (3, 16, 16) and pixels.min() == -1 and pixels.max() > 0.5  # white ink on black
    assert torch.equal(pixels[0], pixels[1])  # gray stored as RGB
