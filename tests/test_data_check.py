"""Every image / clip decoded once before step 0: bad files listed in one line or skipped, the verdicts cached
by (path, size, mtime), one-line errors from DataLoader workers, empty captions counted."""

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from tsm.config import DataConfig
from tsm.data import (
    check_cache_path,
    load_dataset,
    step_loader,
    user_cache_dir,
    write_digits_image_folder,
)
from tsm.errors import TsmError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """The check's verdicts go to a tmp folder, never to the user's cache."""
    monkeypatch.setenv("TSM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bad_folder(tmp_path: Path, n: int = 4) -> Path:
    """n good digits, then digit_000n.png truncated and digit_000{n+1}.png not an image at all."""
    root = write_digits_image_folder(tmp_path / "images", n=n + 2, size=16)
    truncate(root / f"digit_{n:04d}.png")
    (root / f"digit_{n + 1:04d}.png").write_text("not an image")
    return root


def load(root: Path, **data) -> object:
    return load_dataset(DataConfig(path=str(root), resolution=16, **data), video=False)


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(TsmError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    return str(info.value)


def count_opens(monkeypatch) -> list[str]:
    """Every PIL.Image.open from now on, by what it was given."""
    opened, real = [], PIL.Image.open

    def counting(fp, *args, **kwargs):
        opened.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    return opened


# ----------------------------------------------------------------------------------------------------
# bad files before step 0
# ----------------------------------------------------------------------------------------------------
def test_bad_files_are_listed_in_one_error_line(tmp_path):
    root = bad_folder(tmp_path)
    msg = one_line_error("2 of 6 images", load, root)
    assert "digit_0004.png" in msg and "digit_0005.png" in msg
    assert "truncated" in msg and "data.skip_bad=true" in msg


def test_many_bad_files_name_five_and_count_the_rest(tmp_path):
    root = write_digits_image_folder(tmp_path / "images", n=10, size=16)
    for i in range(8):
        truncate(root / f"digit_{i:04d}.png")
    msg = one_line_error("8 of 10 images", load, root)
    assert [f"digit_{i:04d}.png" in msg for i in range(8)] == [True] * 5 + [False] * 3
    assert "and 3 more" in msg


def test_skip_bad_keeps_the_good_files_and_says_so(tmp_path, caplog):
    root = bad_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tsm.data"):
        ds = load(root, skip_bad=True)
    assert [p.name for p in ds.paths] == [f"digit_{i:04d}.png" for i in range(4)]
    assert ds.captions == [(root / f"digit_{i:04d}.txt").read_text().strip() for i in range(4)]
    assert [ds[i]["pixels"].shape for i in range(len(ds))] == [(3, 16, 16)] * 4
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(
        "skipped 2 unreadable files of 6: digit_0004.png, digit_0005"
    )


def test_skip_bad_with_buckets_assigns_only_the_good_files(tmp_path):
    ds = load(
        bad_folder(tmp_path), skip_bad=True, buckets=[[16, 16], [32, 16]]
    )  # headers read after the check
    assert len(ds.item_buckets) == len(ds.paths) == 4


@pytest.mark.parametrize("skip_bad", [False, True])
def test_no_readable_file_is_one_line(tmp_path, skip_bad):
    root = write_digits_image_folder(tmp_path / "images", n=2, size=16)
    for name in ("digit_0000.png", "digit_0001.png"):
        truncate(root / name)
    one_line_error("none of the 2 images in .* can be read", load, root, skip_bad=skip_bad)


def test_bad_clips_are_listed_and_skipped(tmp_path):
    for name, sizes in {"good": [16, 16, 16], "broken": [16, 16, 16], "mixed": [16, 24, 16]}.items():
        folder = tmp_path / "clips" / name
        folder.mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new("RGB", (size, size), (40 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / "caption.txt").write_text(name)
    truncate(tmp_path / "clips" / "broken" / "1.png")  # a frame item() never reads (it takes 0 and 2 of 3)
    cfg = DataConfig(path=str(tmp_path / "clips"), resolution=8, num_frames=2)
    msg = one_line_error("2 of 3 clips", load_dataset, cfg, video=True)
    assert "broken, mixed (broken: frame 1.png: " in msg
    cfg.skip_bad = True
    ds = load_dataset(cfg, video=True)
    assert [p.name for p in ds.paths] == ["good"] and ds.captions == ["good"] and len(ds.frames) == 1


def test_video_file_is_decoded_and_counted_at_load(tmp_path):
    av = pytest.importorskip("av")
    root = tmp_path / "clips"
    root.mkdir()
    with av.open(str(root / "ramp.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for level in range(0, 200, 40):  # 5 frames
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), level, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    (root / "bad.mp4").write_bytes(b"\x00" * 100)
    for name in ("ramp", "bad"):
        (root / f"{name}.txt").write_text(name)
    one_line_error(r"1 of 2 clips .* bad\.mp4 \(bad\.mp4: ", load_dataset, DataConfig(path=str(root)), True)
    cfg = DataConfig(path=str(root), resolution=16, num_frames=6, skip_bad=True)
    one_line_error("ramp.mp4 has 5 frames, fewer than num_frames=6", load_dataset, cfg, video=True)
    cfg.num_frames = 5  # the stored count is checked against the new num_frames: no decode needed for that
    assert [p.name for p in load_dataset(cfg, video=True).paths] == ["ramp.mp4"]


# ----------------------------------------------------------------------------------------------------
# the verdicts are cached
# ----------------------------------------------------------------------------------------------------
def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    assert user_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("TSM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "tsm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "tsm"


def test_a_second_load_decodes_only_what_changed(tmp_path, monkeypatch, cache_dir):
    root = bad_folder(tmp_path)
    opened = count_opens(monkeypatch)
    load(root, skip_bad=True)
    assert len(opened) == 6  # every file once
    store = check_cache_path(root)
    assert store.parent.parent == cache_dir and store.is_file()
    assert not list(store.parent.glob("*.tmp"))  # written through a tmp file, then replaced
    items = json.loads(store.read_text())["items"]
    assert {n: v["bad"] is None for n, v in items.items()} == {f"digit_{i:04d}.png": i < 4 for i in range(6)}
    assert items["digit_0000.png"]["signature"] == [
        [
            "digit_0000.png",
            (root / "digit_0000.png").stat().st_size,
            (root / "digit_0000.png").stat().st_mtime_ns,
        ]
    ]

    opened.clear()
    load(root, skip_bad=True)
    assert opened == []  # nothing decoded, bad files still known as bad

    stat = (root / "digit_0001.png").stat()
    os.utime(root / "digit_0001.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    write_digits_image_folder(tmp_path / "fresh", n=5, size=16)
    (tmp_path / "fresh" / "digit_0004.png").replace(root / "digit_0004.png")  # the truncated file fixed
    opened.clear()
    ds = load(root, skip_bad=True)
    assert len(opened) == 2 and len(ds) == 5  # only the two changed files decoded; the fixed one kept


def test_an_unusable_cache_file_is_checked_again(tmp_path, monkeypatch):
    root = write_digits_image_folder(tmp_path / "images", n=3, size=16)
    load(root)
    check_cache_path(root).write_text("{not json")
    opened = count_opens(monkeypatch)
    load(root)
    assert len(opened) == 3 and json.loads(check_cache_path(root).read_text())["format"] == 1


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TSM_CACHE", str(tmp_path / "a_file"))  # no folder can be made below a file
    with caplog.at_level(logging.WARNING, logger="tsm.data"):
        ds = load(write_digits_image_folder(tmp_path / "images", n=2, size=16))
    assert len(ds) == 2 and [r.getMessage()[:29] for r in caplog.records] == ["cannot save the data check in"]


# ----------------------------------------------------------------------------------------------------
# after the check: one line from the item loader and from DataLoader workers
# ----------------------------------------------------------------------------------------------------
def test_a_file_corrupted_after_the_check_is_one_line_from_workers(tmp_path):
    root = write_digits_image_folder(tmp_path / "images", n=4, size=16)
    ds = load(root)
    truncate(root / "digit_0002.png")
    cfg = SimpleNamespace(train=SimpleNamespace(seed=0), data=SimpleNamespace(num_workers=2))
    loader = step_loader(ds, cfg, batch=2, micro=2, local=2, rank=0, total=4)(0)  # 8 draws: all 4 items
    msg = one_line_error("cannot read image", list, loader)
    assert msg.startswith(f"cannot read image {root / 'digit_0002.png'} (image file is truncated)")


def test_any_failure_while_loading_an_item_names_the_file(tmp_path, monkeypatch):
    ds = load(write_digits_image_folder(tmp_path / "images", n=2, size=16))

    def broken(image, crop):
        raise RuntimeError("out of memory\nmore detail")

    monkeypatch.setattr("tsm.data.to_pixels", broken)
    msg = one_line_error("cannot load", ds.__getitem__, 1)
    assert str(ds.paths[1]) in msg and "RuntimeError: out of memory" in msg
    with pytest.raises(IndexError):  # iterating a dataset by index still stops at its end
        ds[2]


# ----------------------------------------------------------------------------------------------------
# empty captions
# ----------------------------------------------------------------------------------------------------
def test_empty_captions_are_counted_in_one_line(tmp_path, caplog):
    root = write_digits_image_folder(tmp_path / "images", n=5, size=16)
    (root / "digit_0001.txt").write_text("")
    (root / "digit_0003.txt").write_text("  \n")
    with caplog.at_level(logging.WARNING, logger="tsm.data"):
        ds = load(root)
    assert [ds.captions[i] for i in (1, 3)] == ["", ""]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(
        "2 of 5 images have an empty caption (they train unconditionally): digit_0001.png, digit_0003.png"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tsm.data"):
        load(root, instance_prompt="a photo of sks digit")  # every caption replaced: nothing to say
        assert caplog.records == []


# ----------------------------------------------------------------------------------------------------
# through `tsm train`
# ----------------------------------------------------------------------------------------------------
def test_train_stops_on_a_bad_file_before_any_checkpoint(tmp_path, capsys):
    import yaml
    from tiny_models import write_tiny_model

    from tsm.cli import main

    root = bad_folder(tmp_path)
    run = tmp_path / "run"
    cfg = {
        "model": {"family": "sd15", "path": str(write_tiny_model("sd15", tmp_path / "sd15"))},
        "experts": {"scales": [2], "rank": 2, "alpha": 2},
        "data": {"path": str(root), "resolution": 16, "num_workers": 2},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "output_dir": str(run)},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tsm train: error: 2 of 6 images in ") and "digit_0005.png" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (run / "checkpoints").exists()
