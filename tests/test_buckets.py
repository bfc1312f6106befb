"""Aspect-ratio buckets (generation, assignment, one-bucket steps, resume), size conditioning, non-square
sampling, and the caption path: instance prompt, trigger, tag shuffling with keep_tokens."""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from test_data import column_ramp, gray, save

from tsm.config import load_config
from tsm.data import (
    CaptionedImageFolder,
    StepBatches,
    collate,
    load_dataset,
    make_buckets,
    nearest_bucket,
    resolve_buckets,
)
from tsm.errors import TsmError


# ----------------------------------------------------------------------------------------------------
# buckets
# ----------------------------------------------------------------------------------------------------
def test_buckets_from_a_pixel_budget():
    # 256^2: for every width w (multiple of 64) the tallest h with w*h <= 65536, its transpose, aspect <= 4
    assert make_buckets(256 * 256) == [
        (128, 512), (128, 448), (128, 384), (192, 320), (256, 256),
        (320, 192), (384, 128), (448, 128), (512, 128),
    ]  # fmt: skip
    buckets = make_buckets(1024 * 1024)
    assert len(buckets) == 33 and buckets[0] == (512, 2048) and buckets[-1] == (2048, 512)
    assert {(1024, 1024), (960, 1088), (1088, 960), (896, 1152), (768, 1344), (640, 1600)} <= set(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and max(w, h) <= 4 * min(w, h)
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)  # tall to wide
    assert make_buckets(1_000_000)[len(make_buckets(1_000_000)) // 2] == (960, 960)  # the largest square
    assert resolve_buckets(65536) == make_buckets(65536) and resolve_buckets(None) is None
    assert resolve_buckets([[512, 512], [768, 512]]) == [(512, 512), (768, 512)]
    with pytest.raises(TsmError, match="at least 4096"):
        make_buckets(4000)


def test_nearest_bucket_by_log_aspect_ratio():
    buckets = [(512, 512), (768, 512), (512, 768), (1024, 512)]
    assert nearest_bucket(1000, 500, buckets) == 3
    assert nearest_bucket(700, 500, buckets) == 1 and nearest_bucket(500, 700, buckets) == 2
    assert nearest_bucket(600, 590, buckets) == 0 and nearest_bucket(40, 40, buckets) == 0
    # 1.23:1 is nearer 1.5:1 in log ratio (0.198 vs 0.207), nearer 1:1 linearly (0.27 vs 0.23)
    assert nearest_bucket(1230, 1000, buckets) == 1 and nearest_bucket(1000, 1230, buckets) == 2
    assert nearest_bucket(100, 100, [(64, 64), (128, 128)]) == 0  # a tie goes to the first listed


def test_items_are_cut_to_their_bucket_with_size_conditioning(tmp_path):
    save(column_ramp(100, 40), tmp_path / "a_wide.png")  # 2.5:1 -> 64x32
    save(column_ramp(40, 80), tmp_path / "b_tall.png")  # 1:2 -> 32x64
    save(column_ramp(50, 48), tmp_path / "c_square.png")  # ~1:1 -> 32x32
    ds = CaptionedImageFolder(tmp_path, resolution=32, buckets=[(32, 32), (64, 32), (32, 64)])
    assert ds.item_buckets == [1, 2, 0]
    wide, tall, square = ds[0], ds[1], ds[2]
    # cover 64x32: scale max(64/100, 32/40) = 0.8 -> 80x32, center crop 8 columns in
    assert wide["pixels"].shape == (3, 32, 64) and wide["key"].endswith(":80x32+8+0/64x32")
    assert wide["original_size"] == (40, 100) and wide["crop_top_left"] == (0, 8)
    # cover 32x64: scale 0.8 -> 32x64 exactly
    assert tall["pixels"].shape == (3, 64, 32) and tall["key"].endswith(":32x64+0+0/32x64")
    assert tall["original_size"] == (80, 40) and tall["crop_top_left"] == (0, 0)
    assert square["pixels"].shape == (3, 32, 32) and square["key"].endswith(":33x32+0+0/32")
    with pytest.raises(TsmError, match="mixes pixel shapes"):
        collate([wide, tall])
    batch = collate([wide, ds[0]])
    assert batch["original_sizes"] == [(40, 100)] * 2 and batch["crop_top_lefts"] == [(0, 8)] * 2


def test_crop_top_left_is_in_the_frame_the_model_sees(tmp_path):
    save(column_ramp(96, 32), tmp_path / "ramp.png")  # already covers 64x32: no resize, 32 columns to spare
    ds = CaptionedImageFolder(tmp_path, 32, center_crop=False, random_flip=True, buckets=[(64, 32)], seed=1)
    seen = set()
    for epoch in range(10):
        item = ds[(0, epoch)]
        top, left = item["crop_top_left"]
        flipped = item["key"].endswith("/flip")
        # in the (mirrored, when flipped) resized image, output column x is column left + x; mirrored column j
        # is source column 95 - j
        source = [95 - (left + x) if flipped else left + x for x in range(64)]
        assert top == 0 and torch.allclose(
            item["pixels"][0, 5], torch.tensor([gray(2 * s) for s in source]), atol=1e-6
        )
        seen.add((flipped, left))
    assert len({f for f, _ in seen}) == 2 and len(seen) > 3


def test_square_path_reports_size_conditioning(tmp_path):
    save(column_ramp(96, 64), tmp_path / "ramp.png")
    item = CaptionedImageFolder(tmp_path, resolution=32)[0]  # 48x32 after resize, 8 columns cut left
    assert item["key"].endswith(":48x32+8+0/32")
    assert item["original_size"] == (64, 96) and item["crop_top_left"] == (0, 8)


def test_cache_keys_are_per_bucket(tmp_path):
    save(column_ramp(96, 48), tmp_path / "ramp.png")
    square = CaptionedImageFolder(tmp_path, resolution=32)[0]
    in_square_bucket = CaptionedImageFolder(tmp_path, 32, buckets=[(32, 32)])[0]
    in_wide_bucket = CaptionedImageFolder(tmp_path, 32, buckets=[(32, 32), (64, 32)])[0]
    # the same pixels have the same key (a cached latent is reused); another bucket is another latent
    assert square["key"] == in_square_bucket["key"]
    assert torch.equal(square["pixels"], in_square_bucket["pixels"])
    assert in_wide_bucket["key"] != square["key"] and in_wide_bucket["key"].endswith("/64x32")
    assert square["key"].split(":")[0] == in_wide_bucket["key"].split(":")[0]  # same file


# ----------------------------------------------------------------------------------------------------
# the bucketed sampler
# ----------------------------------------------------------------------------------------------------
class Buckets:
    """A dataset stand-in: only what StepBatches reads."""

    epoch_indexed = True

    def __init__(self, item_buckets):
        self.item_buckets = list(item_buckets)

    def __len__(self):
        return len(self.item_buckets)


SIZES = [0, 1, 0, 2, 0, 1, 0, 1, 0]  # bucket 0: 5 items, bucket 1: 3, bucket 2: 1


def global_batches(dataset, seed, start, total, batch, accum, world):
    """The global batch of every step, reassembled from each process's micro-batches."""
    micro, per_rank = batch // accum, {}
    for rank in range(world):
        per_rank[rank] = iter(StepBatches(dataset, seed, start, total, batch, micro, micro // world, rank))
    steps = []
    for _ in range(start, total):
        keys = []
        for _ in range(accum):
            for rank in range(world):
                keys += next(per_rank[rank])
        steps.append(keys)
    return steps


def test_every_step_is_one_bucket_and_an_epoch_sees_every_item():
    ds = Buckets(SIZES)
    steps = global_batches(ds, seed=0, start=0, total=12, batch=4, accum=1, world=1)
    per_epoch = 2 + 1 + 1  # ceil(5/4) + ceil(3/4) + ceil(1/4)
    for s, keys in enumerate(steps):
        assert len(keys) == 4 and len({SIZES[i] for i, _ in keys}) == 1, keys
        assert {e for _, e in keys} == {s // per_epoch}
    for epoch in range(3):
        seen = [i for keys in steps[epoch * per_epoch : (epoch + 1) * per_epoch] for i, _ in keys]
        assert sorted(set(seen)) == list(range(len(SIZES)))
        assert seen.count(3) == 4  # the bucket of one repeats it to fill its step
    assert steps[:per_epoch] != steps[per_epoch : 2 * per_epoch]  # reshuffled every epoch


def test_steps_are_the_same_for_any_split_and_resume():
    ds = Buckets(SIZES)
    ref = global_batches(ds, seed=3, start=0, total=10, batch=4, accum=1, world=1)
    for accum, world in [(2, 1), (1, 2), (2, 2), (1, 4), (4, 1)]:
        assert global_batches(ds, 3, 0, 10, 4, accum, world) == ref, (accum, world)
        assert global_batches(ds, 3, 6, 10, 4, accum, world) == ref[6:], (accum, world)  # resumed at 6
    assert global_batches(ds, 4, 0, 10, 4, 1, 1) != ref
    # each process's micro-batch is one bucket too, and the DataLoader sees exactly these keys
    for keys in StepBatches(ds, 3, 0, 10, 4, 2, 1, 1):
        assert len({SIZES[i] for i, _ in keys}) == 1


def test_the_loader_batches_one_bucket(tmp_path):
    from tsm.data import step_loader

    for i, size in enumerate([(40, 20), (20, 20), (20, 40), (42, 20), (21, 20), (44, 20)]):
        save(column_ramp(*size), tmp_path / f"{i}.png", f"c{i}")
    cfg = load_config(
        None, [f"data.path={tmp_path}", "data.resolution=8", "data.buckets=[[8,8],[16,8],[8,16]]"]
    )
    ds = load_dataset(cfg.data, video=False, seed=0)
    batches = list(step_loader(ds, cfg, batch=2, micro=2, local=2, rank=0, total=5)(0))
    shapes = [tuple(b["pixels"].shape) for b in batches]
    assert set(shapes) <= {(2, 3, 8, 8), (2, 3, 8, 16), (2, 3, 16, 8)} and len(set(shapes)) == 3
    for b in batches:
        assert len(b["original_sizes"]) == 2 and len(b["crop_top_lefts"]) == 2


# ----------------------------------------------------------------------------------------------------
# captions: instance prompt, trigger, tags
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def tagged(tmp_path):
    for i in range(3):
        save(Image.new("RGB", (8, 8)), tmp_path / f"{i}.png", f"t{i}a, t{i}b, c, d, e")
    return tmp_path


def captions(path, *overrides, epoch=0, seed=0):
    cfg = load_config(None, [f"data.path={path}", "data.resolution=8", *overrides])
    ds = load_dataset(cfg.data, video=False, seed=seed)
    return [ds[(i, epoch)]["caption"] for i in range(len(ds))]


def test_trigger_and_instance_prompt(tagged):
    assert captions(tagged) == [f"t{i}a, t{i}b, c, d, e" for i in range(3)]
    assert captions(tagged, "data.trigger=sks") == [f"sks, t{i}a, t{i}b, c, d, e" for i in range(3)]
    assert captions(tagged, "data.instance_prompt=a photo of a dog") == ["a photo of a dog"] * 3
    both = captions(tagged, "data.instance_prompt=a photo of a dog", "data.trigger=sks")
    assert both == ["sks, a photo of a dog"] * 3
    # caption dropout comes last: it empties the trigger too
    assert captions(tagged, "data.trigger=sks", "data.caption_dropout=1.0") == [""] * 3


def test_tag_shuffle_keeps_the_first_tokens_and_is_seeded(tagged):
    shuffle = ("data.shuffle_tags=true", "data.keep_tokens=2")
    assert captions(tagged, *shuffle, epoch=0) == [  # golden: numpy's default_rng([seed, epoch, index, 3])
        "t0a, t0b, e, c, d", "t1a, t1b, c, d, e", "t2a, t2b, e, d, c",
    ]  # fmt: skip
    orders = set()
    for epoch in range(8):
        for i, caption in enumerate(captions(tagged, *shuffle, epoch=epoch)):
            tags = caption.split(", ")
            assert tags[:2] == [f"t{i}a", f"t{i}b"] and sorted(tags[2:]) == ["c", "d", "e"]
            orders.add(tuple(tags[2:]))
    assert len(orders) > 3  # the order changes with the epoch
    assert captions(tagged, *shuffle, epoch=5) == captions(tagged, *shuffle, epoch=5)  # resumable
    assert captions(tagged, *shuffle, epoch=5) != captions(tagged, *shuffle, epoch=5, seed=1)
    # the trigger counts as kept: keep_tokens=1 keeps only it, and it is never shuffled away
    firsts = set()
    for epoch in range(8):
        for caption in captions(tagged, "data.shuffle_tags=true", "data.trigger=sks", epoch=epoch):
            tags = caption.split(", ")
            assert tags[0] == "sks" and len(tags) == 6
            firsts.add(tags[1])
    assert len(firsts) > 1  # keep_tokens=0: every caption tag moves
    kept = captions(tagged, "data.shuffle_tags=true", "data.trigger=sks", "data.keep_tokens=2", epoch=3)
    assert all(c.startswith(f"sks, t{i}a, ") for i, c in enumerate(kept))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.keep_tokens=2"], "data.shuffle_tags=true"),
        (["data.buckets=1000"], "pixel budget must be >= 4096"),
        (["data.buckets=[[512,500]]"], "multiples of 8"),
        (["data.buckets=[[512,512],[512,512]]"], "distinct"),
        (["data.buckets=[]"], "data.buckets must be"),
        (["data.buckets=65536", "train.method=distill"], "leave data.buckets unset"),
        (["data.trigger=' '"], "data.trigger is empty"),
    ],
)
def test_bad_data_keys_are_one_line_errors(overrides, match):
    with pytest.raises(TsmError, match=match) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# end to end: tsm train on mixed aspect ratios, resume, tsm sample --width/--height
# ----------------------------------------------------------------------------------------------------
def test_train_on_buckets_resumes_and_samples_non_square(tmp_path, capsys):
    from tiny_models import write_tiny_model

    from tsm.cli import main
    from tsm.data import write_digits_image_folder

    model = write_tiny_model("sd15", tmp_path / "sd15")
    images = write_digits_image_folder(tmp_path / "images", n=6, size=16)
    for k, png in enumerate(sorted(images.glob("*.png"))):  # wide, tall and square digits
        size = [(32, 16), (16, 32), (16, 16)][k % 3]
        Image.open(png).resize(size).save(png)
    run = tmp_path / "run"
    cfg = tmp_path / "buckets.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"family": "sd15", "path": str(model)},
                "experts": {"scales": [2, 1], "rank": 2, "alpha": 2},
                "data": {"path": str(images), "resolution": 16, "buckets": [[16, 16], [24, 16], [16, 24]]},
                "optim": {"lr": 1e-3},
                "train": {
                    "steps": 4, "batch_size": 2, "checkpoint_every": 2, "output_dir": str(run),
                    "validation_prompts": [], "log_with": "none",
                },
            }
        )
    )  # fmt: skip
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err
    shapes = {
        tuple(load_file(f)["mean"].shape)
        for f in (run / "cache").rglob("*.safetensors")
        if "mean" in load_file(f)
    }
    assert shapes == {(4, 8, 8), (4, 8, 12), (4, 12, 8)}  # one latent per bucket, (C, h, w)
    want = load_file(run / "checkpoints" / "step_0000004" / "unet.safetensors")
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "unet.safetensors").unlink()
    assert main(["train", str(cfg), "--resume"]) == 0, capsys.readouterr().err
    got = load_file(run / "checkpoints" / "step_0000004" / "unet.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert any(v.abs().sum() > 0 for k, v in got.items() if ".lora_B." in k)

    out = tmp_path / "samples"
    argv = ["sample", str(run), "--prompt", "a digit", "--seeds", "0", "--steps", "2", "--out", str(out)]
    assert main([*argv, "--width", "24", "--height", "16"]) == 0, capsys.readouterr().err
    assert Image.open(out / "p00_seed0.png").size == (24, 16)
    assert main([*argv, "--height", "24"]) == 0  # the width defaults to data.resolution
    assert Image.open(out / "p00_seed0.png").size == (16, 24)
    assert main(argv) == 0
    assert Image.open(out / "p00_seed0.png").size == (16, 16)  # default unchanged


def test_non_square_sampling_flow_family_and_packed_error(tmp_path):
    from tiny_models import write_tiny_model

    from tsm.models import get_family
    from tsm.sampling import _size, sample

    c = get_family("sd3").load(str(write_tiny_model("sd3", tmp_path / "sd3")))
    images = sample(c, ["a cat"], [0], steps=2, guidance_scale=1.0, resolution=(16, 24), progress=False)
    assert images.shape == (1, 3, 16, 24) and images.std() > 0
    square = sample(c, ["a cat"], [0], steps=2, guidance_scale=1.0, resolution=16, progress=False)
    assert torch.equal(square, sample(c, ["a cat"], [0], 2, 1.0, resolution=(16, 16), progress=False))
    with pytest.raises(TsmError, match="flux family samples square images only"):
        _size(SimpleNamespace(family=get_family("flux")), (16, 32), 1)
    assert math.prod(_size(c, (16, 24), 1)[1]) == 4 * 8 * 12
