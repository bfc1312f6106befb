"""Image and video folders with captions, an on-disk cache of latents and text embeddings, bundled digits.

Folders follow the diffusers / kohya conventions, so a dataset prepared for their scripts works unchanged:

    photos/                          clips/
      a.png   a.txt                    walk/00001.png 00002.png ...   walk.txt   (or walk/caption.txt)
      sub/b.jpg                        run.mp4   run.txt
      metadata.jsonl                   metadata.jsonl
    {"file_name": "sub/b.jpg", "text": "a red bicycle"}     (one JSON object a line; "caption" works too)

A ``.txt`` sidecar wins over ``metadata.jsonl``. Every random choice (crop, flip, tag order, caption dropout) is
drawn from ``(seed, epoch, index)``, so a resumed run sees the same samples as one that never stopped. The epoch
can travel with the index (``dataset[(index, epoch)]``, what `step_loader` asks for, so DataLoader workers
need no epoch of their own), or be set with ``dataset.set_epoch(e)`` before a plain ``dataset[index]``.

Aspect-ratio buckets (``buckets=[(width, height), ...]``, or `make_buckets` from a pixel budget): each image
goes to the bucket nearest its aspect ratio, is resized to cover it and cropped to it; `StepBatches` then draws
every step's whole batch from one bucket, so any split into processes and micro-batches stacks.

`load_dataset` decodes every image and clip once before training (`check_files`): bad files are listed in
one error, or with ``data.skip_bad`` left out and counted; the verdicts are kept in the user's cache folder
(`user_cache_dir`) by each file's (path, size, mtime), so the next run decodes only what changed. Empty
captions are counted in one warning. A file that goes bad later is still a one-line error naming it, also
from DataLoader workers.

``LatentCache`` stores tensors as safetensors files keyed by (item key, model id, tag). An item's ``key`` is
the sha256 of its file bytes plus its crop and flip, so a cached latent is reused exactly when the pixels
would be the same. Text embeddings are cached only while the text encoder is frozen; when it carries
experts, its output depends on the expert, so key them per expert::

    cache = LatentCache("runs/x/cache", model_id="sd15@main")
    mean, std = cached_latent_dist(vae, batch["pixels"], batch["keys"], cache)
    latents = (mean + std * torch.randn_like(std)) * vae.config.scaling_factor   # still a sample
    text_key = text_cache_tag(caption, expert_index=3, model_id="text_encoder@<experts file sha256>")
    embeds = cache.get(text_key) or cache.put(text_key, "", {"prompt_embeds": encode(caption)})
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from tsm.config import DataConfig
from tsm.errors import TsmError
from tsm.io import _atomic_save, _open

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm")  # anything PyAV decodes; mp4 is the usual one
CAPTION_KEYS = ("text", "caption")  # metadata.jsonl columns: diffusers' default, then kohya's name
CACHE_FORMAT = "1"  # tsm_cache in a cache file's metadata; bump when what is stored changes
# independent random streams per item, so turning one augmentation on never changes the others' draws
_CROP, _FLIP, _DROPOUT, _TAGS = 0, 1, 2, 3
BUCKET_STEP = 64  # buckets made from a pixel budget have sides that are multiples of this (kohya's default)
MAX_ASPECT = 4.0  # and long side / short side <= this: SDXL's own training buckets span 512x2048 .. 2048x512

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------
# files, captions, pixels
# ----------------------------------------------------------------------------------------------------
def _natural_key(path: Path) -> list[Any]:
    """Sort frame_2 before frame_10: frame folders are often not zero-padded."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.name)]


def _walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk in a stable order, skipping hidden folders (.ipynb_checkpoints, .cache); clearing the
    yielded ``dirs`` list stops the walk from entering them."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(folder), dirs, sorted(f for f in files if not f.startswith("."))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _read_metadata(root: Path) -> dict[Path, str]:
    """Captions from every metadata.jsonl below root, by absolute path (names are relative to that file)."""
    captions: dict[Path, str] = {}
    for folder, _, files in _walk(root):
        if "metadata.jsonl" not in files:
            continue
        path = folder / "metadata.jsonl"
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # bytes: json detects UTF-8/16/32 itself
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TsmError(f"{path}:{lineno} is not valid JSON; fix or delete that line") from None
            row = row if isinstance(row, dict) else {}
            name, text = row.get("file_name"), next((row[k] for k in CAPTION_KEYS if k in row), None)
            if not (isinstance(name, str) and isinstance(text, str)):
                raise TsmError(
                    f'{path}:{lineno} must look like {{"file_name": "a.png", "text": "a caption"}}'
                )
            captions[(folder / name.rstrip("/")).resolve()] = text.strip()
    return captions


def _read_caption(sidecars: Sequence[Path], media: Path, metadata: dict[Path, str]) -> str | None:
    """The first sidecar that exists, else the metadata.jsonl entry, else None."""
    for sidecar in sidecars:
        if sidecar.is_file():
            try:
                return sidecar.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise TsmError(
                    f"cannot read caption {sidecar} ({type(e).__name__}); save it as UTF-8 text"
                ) from None
    return metadata.get(media.resolve())


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TsmError(
            f"cannot read {path} ({e.strerror or type(e).__name__}); check it exists and is readable"
        ) from None


# what PIL raises for a file it cannot read (truncated, not an image, a decompression bomb, a bad header)
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _reason(e: BaseException) -> str:
    """Why a file could not be read, in a few words (the caller names the file)."""
    if isinstance(e, UnidentifiedImageError):  # its message names an io.BytesIO object, not the file
        return "not an image file PIL can identify"
    strerror = getattr(e, "strerror", None)  # OSError and PyAV's errors: without errno and file name
    text = strerror or (str(e).splitlines()[0] if str(e) else "")
    return text or type(e).__name__


def _rgb(data: bytes) -> Image.Image:
    """RGB image from file bytes, upright; raises what PIL raises (`_IMAGE_ERRORS`)."""
    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    return image.convert("RGB")  # PIL decodes lazily: this forces the decode, so truncated files fail here


def _decode_image(data: bytes, path: Path) -> Image.Image:
    """RGB image from file bytes; a file PIL cannot decode is an error naming ``path``."""
    try:
        return _rgb(data)
    except _IMAGE_ERRORS as e:
        raise TsmError(f"cannot read image {path} ({_reason(e)}); replace or delete the file") from None


@dataclass(frozen=True)
class Crop:
    """Where one item comes from: resize to (width, height), cut a crop_width x crop_height window at
    (left, top), maybe mirror."""

    width: int
    height: int
    left: int
    top: int
    crop_width: int
    crop_height: int
    flip: bool

    @property
    def tag(self) -> str:  # part of the item key: the same file cut differently is a different latent
        w, h = self.crop_width, self.crop_height
        size = f"{w}" if w == h else f"{w}x{h}"  # a square keeps the key it had before buckets existed
        return f"{self.width}x{self.height}+{self.left}+{self.top}/{size}{'/flip' if self.flip else ''}"

    @property
    def top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the resized image as the model sees it: mirrored with the flip, as
        diffusers' SDXL scripts (flip, then crop) and kohya report SDXL's crop conditioning."""
        left = self.width - self.left - self.crop_width if self.flip else self.left
        return self.top, left


def to_pixels(image: Image.Image, crop: Crop) -> torch.Tensor:
    """Resize, crop and flip an RGB image into a float32 tensor (3, crop_height, crop_width) in [-1, 1]."""
    if image.size != (crop.width, crop.height):
        # LANCZOS anti-aliases when shrinking; BICUBIC rings less when enlarging
        shrink = crop.width < image.width
        resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
        image = image.resize((crop.width, crop.height), resample=resample)
    image = image.crop((crop.left, crop.top, crop.left + crop.crop_width, crop.top + crop.crop_height))
    if crop.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as `_decode_image` will see it, from the file's header (no decode)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that exif_transpose turns
                width, height = height, width
    except _IMAGE_ERRORS as e:
        raise TsmError(f"cannot read image {path} ({_reason(e)}); replace or delete the file") from None
    return width, height


# ----------------------------------------------------------------------------------------------------
# aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------
def make_buckets(
    budget: int, step: int = BUCKET_STEP, max_aspect: float = MAX_ASPECT
) -> list[tuple[int, int]]:
    """(width, height) buckets for a pixel budget, kohya's rule: for every width w that is a multiple of
    ``step``, the tallest height h (a multiple of ``step``) with w * h <= budget, and its transpose (h, w);
    plus the largest square. Pairs with long side / short side > ``max_aspect`` are left out. Sorted by
    aspect ratio (tall to wide). ``make_buckets(1024 ** 2)`` spans 512x2048 .. 2048x512, with 1024x1024."""
    if budget < step * step:
        raise TsmError(
            f"data.buckets={budget} pixels is below one {step}x{step} bucket; give at least {step**2}"
        )
    side = math.isqrt(budget) // step * step
    buckets = {(side, side)}
    for width in range(step, budget // step + 1, step):
        height = budget // width // step * step
        if height >= step and max(width, height) <= max_aspect * min(width, height):
            buckets |= {(width, height), (height, width)}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def resolve_buckets(spec: int | Sequence[Sequence[int]] | None) -> list[tuple[int, int]] | None:
    """``data.buckets`` as a list of (width, height): a pixel budget goes through `make_buckets`."""
    if spec is None:
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        return make_buckets(spec)
    buckets = [tuple(int(v) for v in b) for b in spec]
    if not buckets or any(len(b) != 2 or min(b) < 1 for b in buckets):
        raise TsmError(f"data.buckets must be [[width, height], ...] of positive sizes, got {spec!r}")
    return buckets  # type: ignore[return-value]


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's, in log ratio (so 2:1 and 1:2 are
    as far from 1:1); a tie goes to the first listed."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


# ----------------------------------------------------------------------------------------------------
# every file checked once before step 0
# ----------------------------------------------------------------------------------------------------
CHECK_FORMAT = 1  # "format" of a check file; bump when what a stored verdict means changes
CHECK_BAR_FROM = 64  # files left to decode from which the check shows a progress bar
NAMED = 5  # bad files (or empty captions) named in one message; the rest are counted


class _Unreadable(Exception):
    """An item that cannot be decoded; the message is the reason, in a few words."""


def user_cache_dir() -> Path:
    """The user's tsm cache folder: ``$TSM_CACHE``, else ``$XDG_CACHE_HOME/tsm``, else ``~/.cache/tsm``."""
    if os.environ.get("TSM_CACHE"):
        return Path(os.environ["TSM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tsm"


def check_cache_path(root: PathLike) -> Path:
    """Where the verdicts of the file check of data folder ``root`` are kept: one JSON file per folder."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return user_cache_dir() / "data_check" / f"{digest}.json"


def _read_checks(path: Path) -> dict[str, Any]:
    """The stored verdicts by item (its path relative to the folder); none when absent or unreadable."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("format") != CHECK_FORMAT:
        return {}
    items = stored.get("items")
    return items if isinstance(items, dict) else {}


def _write_checks(path: Path, root: Path, items: dict[str, Any]) -> None:
    """Store the verdicts atomically (a tmp file, then os.replace): a crash, or another process of the same
    run writing too, leaves the old file or a whole new one. A cache that cannot be written is no error."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": CHECK_FORMAT, "root": str(root.resolve()), "items": items}))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("cannot save the data check in %s (%s); the next run checks every file again", path, e)


def _signature(root: Path, files: Sequence[Path]) -> list[list[Any]] | None:
    """(path, size, mtime) of an item's files: a stored verdict holds while this is unchanged. None when a
    file cannot be stat'ed (the check then fails on it, and nothing is stored)."""
    signature = []
    for f in files:
        try:
            stat = f.stat()
        except OSError:
            return None
        signature.append([f.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return signature


def _main_process() -> bool:
    """Not a second process of a multi-process run (accelerate sets RANK): only one prints the data lines."""
    return os.environ.get("RANK", "0") == "0"


def _named(names: Sequence[str]) -> str:
    """'a.png, b.png, c.png' for a few names, '..., e.png and 7 more' for many."""
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return ", ".join(names[:NAMED]) + more


# ----------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------
class _CaptionedFolder(Dataset):
    """What image and video folders share: arguments, seeded draws, caption dropout, crop choice, the file
    check."""

    kind = "images"
    noun = "images"  # what an item is, in messages
    per_item = ("paths", "captions")  # the lists with one entry per item (left out together by skip_bad)

    def __init__(
        self,
        root: PathLike,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        caption_dropout: float,
        seed: int,
        instance_prompt: str | None = None,
        trigger: str | None = None,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
    ) -> None:
        if resolution < 1:
            raise TsmError(f"resolution must be >= 1, got {resolution}")
        if seed < 0:
            raise TsmError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise TsmError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if keep_tokens < 0 or (keep_tokens and not shuffle_tags):
            raise TsmError(f"keep_tokens={keep_tokens} needs shuffle_tags (and >= 0): it keeps tags in place")
        self.root = Path(root)
        if not self.root.is_dir():
            raise TsmError(
                f"data folder {self.root} does not exist; set data.path to a folder of {self.kind}"
            )
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.instance_prompt, self.trigger = instance_prompt, trigger
        self.shuffle_tags, self.keep_tokens = shuffle_tags, keep_tokens
        self.epoch = 0
        self.paths: list[Path] = []
        self.captions: list[str] = []  # as read from the files
        self.buckets: list[tuple[int, int]] | None = None  # (width, height) of each bucket; None: square
        self.item_buckets: list[int] | None = None  # the bucket of each item (what `StepBatches` groups by)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crops, flips and caption dropout (same epoch, same draws: resumable)."""
        if epoch < 0:
            raise TsmError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    epoch_indexed = True  # items can be asked for as dataset[(index, epoch)] (what `step_loader` does)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``index`` as drawn in the current epoch (`set_epoch`), or ``dataset[(index, epoch)]``: the
        epoch travels with the index, so DataLoader workers need no `set_epoch` of their own."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        path = self.paths[int(index)]  # an IndexError stays one: iterating a dataset stops on it
        try:
            return self.item(int(index), int(epoch))
        except TsmError:
            raise
        except Exception as e:  # any other failure: still one line naming the file (`_Loader` passes it on)
            raise TsmError(
                f"cannot load {path} ({type(e).__name__}: {_reason(e)}); check or replace the file"
            ) from e

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    # --- the file check -------------------------------------------------------------------------------
    def files(self, index: int) -> list[Path]:
        """The files item ``index`` is read from."""
        return [self.paths[index]]

    def decode_all(self, index: int) -> dict[str, Any]:
        """Decode item ``index`` in full (raising `_Unreadable`); what to remember about it."""
        raise NotImplementedError

    def check_files(self, skip_bad: bool) -> list[dict[str, Any]]:
        """Decode every item once before training, so a bad file stops the run before step 0 with the list
        of every bad file rather than at the step that first reads it. Verdicts are kept in
        `check_cache_path` (root) by each file's (path, size, mtime), so a later run decodes only what changed.
        Bad items are an error, or with ``skip_bad`` left out and counted; none readable is an error either
        way. Returns the verdicts of the items kept."""
        store = check_cache_path(self.root)
        known = _read_checks(store)
        names = [p.relative_to(self.root).as_posix() for p in self.paths]
        signatures = [_signature(self.root, self.files(i)) for i in range(len(self))]
        verdicts: dict[str, dict[str, Any]] = {}
        for name, signature in zip(names, signatures, strict=True):
            stored = known.get(name)
            if signature is not None and isinstance(stored, dict) and stored.get("signature") == signature:
                verdicts[name] = stored
        todo = [i for i, n in enumerate(names) if n not in verdicts]
        quiet = len(todo) < CHECK_BAR_FROM or not _main_process()
        for i in tqdm(todo, desc="checking data", unit="file", disable=quiet):
            try:
                verdicts[names[i]] = {"signature": signatures[i], "bad": None, **self.decode_all(i)}
            except _Unreadable as e:
                verdicts[names[i]] = {"signature": signatures[i], "bad": str(e)}
        if todo:
            kept = {n: v for n, v in verdicts.items() if v["signature"] is not None}
            _write_checks(store, self.root, kept)
        bad = [i for i, n in enumerate(names) if verdicts[n]["bad"]]
        if bad:
            first = f"{names[bad[0]]}: {verdicts[names[bad[0]]]['bad']}"
            listed = _named([names[i] for i in bad])
            if len(bad) == len(names):
                raise TsmError(
                    f"none of the {len(names)} {self.noun} in {self.root} can be read ({first}); "
                    "replace them or fix data.path"
                )
            if not skip_bad:
                raise TsmError(
                    f"{len(bad)} of {len(names)} {self.noun} in {self.root} cannot be read: {listed} "
                    f"({first}); replace or delete them, or set data.skip_bad=true to train without them"
                )
            if _main_process():
                log.warning("skipped %d unreadable files of %d: %s (%s)", len(bad), len(names), listed, first)
            keep = sorted(set(range(len(names))) - set(bad))
            for attr in self.per_item:
                setattr(self, attr, [getattr(self, attr)[i] for i in keep])
            names = [names[i] for i in keep]
        return [verdicts[n] for n in names]

    def warn_empty_captions(self) -> None:
        """One line counting the items whose caption is empty (unless instance_prompt replaces them all):
        an empty .txt is more often a mistake than a wish to train without text."""
        if self.instance_prompt is not None or not _main_process():
            return
        empty = [
            p.relative_to(self.root).as_posix()
            for p, c in zip(self.paths, self.captions, strict=True)
            if not c
        ]
        if empty:
            trains = "on the trigger alone" if self.trigger else "unconditionally"
            log.warning(
                "%d of %d %s have an empty caption (they train %s): %s; write their captions, or set "
                "data.instance_prompt", len(empty), len(self), self.noun, trains, _named(empty),
            )  # fmt: skip

    def _rng(self, index: int, stream: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index, stream])

    def caption_at(self, index: int, epoch: int | None = None) -> str:
        """The caption item ``index`` trains on in ``epoch`` (default: the current one), built in this order:
        ``instance_prompt`` (when set) replaces the file's caption; ``trigger`` is put in front
        ("trigger, caption"); with ``shuffle_tags`` the comma-separated tags after the first
        ``keep_tokens`` (the trigger counts as one, and always stays first) are shuffled, seeded by
        (seed, epoch, index); last, "" with probability caption_dropout. This is the only place training
        drops captions (classifier-free guidance)."""
        caption = self.captions[index] if self.instance_prompt is None else self.instance_prompt
        if self.trigger or self.shuffle_tags:
            tags = [t.strip() for t in caption.split(",")] if self.shuffle_tags else [caption]
            tags, keep = [t for t in tags if t], self.keep_tokens
            if self.trigger:
                tags, keep = [self.trigger, *tags], max(keep, 1)
            if self.shuffle_tags and len(tags) - keep > 1:
                order = self._rng(index, _TAGS, epoch).permutation(len(tags) - keep)
                tags = tags[:keep] + [tags[keep + int(i)] for i in order]
            caption = ", ".join(tags)
        if self.caption_dropout > 0 and self._rng(index, _DROPOUT, epoch).random() < self.caption_dropout:
            return ""
        return caption

    def _caption(self, what: str, media: Path, sidecars: list[Path], metadata: dict[Path, str]) -> str:
        """The caption of an image or clip; none is an error naming both ways to give one."""
        caption = _read_caption(sidecars, media, metadata)
        if caption is None:
            rel = media.relative_to(self.root).as_posix()
            raise TsmError(
                f"{what} {media} has no caption; write it in {sidecars[0]} or add "
                f'{{"file_name": "{rel}", "text": "..."}} to {self.root / "metadata.jsonl"}'
            )
        return caption

    def target_size(self, index: int) -> tuple[int, int]:
        """(width, height) item ``index`` is cut to: its bucket's, else resolution x resolution."""
        if self.buckets is None or self.item_buckets is None:
            return self.resolution, self.resolution
        return self.buckets[self.item_buckets[index]]

    def _crop(self, width: int, height: int, index: int, epoch: int | None = None) -> Crop:
        """Resize to cover the target (the square, or the item's bucket) keeping the aspect ratio, then a
        center or seeded crop. For the square this is the shorter side to resolution."""
        out_w, out_h = self.target_size(index)
        scale = max(out_w / width, out_h / height)
        w, h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
        if self.center_crop:  # rounding as torchvision's CenterCrop, which diffusers' scripts use
            left, top = round((w - out_w) / 2), round((h - out_h) / 2)
        else:
            rng = self._rng(index, _CROP, epoch)
            left, top = int(rng.integers(0, w - out_w + 1)), int(rng.integers(0, h - out_h + 1))
        flip = self.random_flip and bool(self._rng(index, _FLIP, epoch).random() < 0.5)
        return Crop(w, h, left, top, out_w, out_h, flip)

    def _sized(self, item: dict[str, Any], image: Image.Image, crop: Crop) -> dict[str, Any]:
        """Add SDXL's size conditioning: the source's (height, width) and the crop's (top, left)."""
        return {**item, "original_size": (image.height, image.width), "crop_top_left": crop.top_left}


class CaptionedImageFolder(_CaptionedFolder):
    """Images found recursively below ``root``, each with a caption; items are
    ``{"pixels": (3, R, R) float32 in [-1, 1], "caption": str, "key": str, "original_size": (h, w),
    "crop_top_left": (top, left)}``, or (3, H, W) of the image's bucket with ``buckets``.

    Captions are checked when the folder is opened (a missing one is an error naming the image, empty ones
    are counted in a warning). With ``check`` every image is decoded once when the folder is opened
    (`check_files`: bad ones are an error listing them, or with ``skip_bad`` left out); else images are
    decoded only when loaded, and a corrupt one is an error naming its file. With ``buckets`` every header
    is read when the folder is opened, to assign the buckets.
    """

    def __init__(
        self,
        root: PathLike,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        buckets: Sequence[tuple[int, int]] | None = None,
        check: bool = False,
        skip_bad: bool = False,
        **captions: Any,
    ) -> None:
        """``captions``: instance_prompt, trigger, shuffle_tags, keep_tokens (see `caption_at`)."""
        super().__init__(root, resolution, center_crop, random_flip, caption_dropout, seed, **captions)
        metadata = _read_metadata(self.root)
        for folder, _, files in _walk(self.root):
            for name in filter(_is_image, files):
                path = folder / name
                self.captions.append(self._caption("image", path, [path.with_suffix(".txt")], metadata))
                self.paths.append(path)
        if not self.paths:
            raise TsmError(
                f"data folder {self.root} has no images ({', '.join(IMAGE_EXTS)}); add some or fix data.path"
            )
        if check:
            self.check_files(skip_bad)
        self.warn_empty_captions()
        if buckets is not None:
            self.buckets = [(int(w), int(h)) for w, h in buckets]
            self.item_buckets = [nearest_bucket(*_image_size(p), self.buckets) for p in self.paths]

    def decode_all(self, index: int) -> dict[str, Any]:
        try:
            _rgb(self.paths[index].read_bytes())
        except _IMAGE_ERRORS as e:  # OSError: also a file that cannot be read
            raise _Unreadable(_reason(e)) from None
        return {}

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        path = self.paths[index]
        data = _read_bytes(path)
        image = _decode_image(data, path)
        crop = self._crop(image.width, image.height, index, epoch)
        key = f"{hashlib.sha256(data).hexdigest()}:{crop.tag}"  # the tag names the crop size: per bucket
        item = {"pixels": to_pixels(image, crop), "caption": self.caption_at(index, epoch), "key": key}
        return self._sized(item, image, crop)


class VideoClipFolder(_CaptionedFolder):
    """Clips below ``root``: folders of frame images (in name order) or video files read with PyAV.
    Items are ``{"pixels": (3, F, R, R) float32 in [-1, 1], "caption", "key"}`` with F = num_frames
    evenly spaced frames, all cut the same way.

    A folder clip's caption is ``<clip>.txt`` next to it or ``caption.txt`` inside it; a video file's is
    ``<clip>.txt``; either can instead have a metadata.jsonl line. Frame folders are counted when the
    dataset is opened; a video file's frames only when it is decoded, or with ``check`` when the dataset is
    opened: every frame of every clip is then decoded once (`check_files`).
    """

    kind = "video clips (frame folders or .mp4 files)"
    noun = "clips"
    per_item = ("paths", "captions", "frames")

    def __init__(
        self,
        root: PathLike,
        resolution: int,
        num_frames: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        check: bool = False,
        skip_bad: bool = False,
        **captions: Any,
    ) -> None:
        """``captions``: instance_prompt, trigger, shuffle_tags, keep_tokens (see `caption_at`)."""
        super().__init__(root, resolution, center_crop, random_flip, caption_dropout, seed, **captions)
        if num_frames < 1:
            raise TsmError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames
        metadata = _read_metadata(self.root)
        self.frames: list[list[Path] | None] = []  # the frame files of a folder clip, None for a video file
        for folder, dirs, files in _walk(self.root):
            frames = sorted((folder / f for f in files if _is_image(f)), key=_natural_key)
            if frames and folder != self.root:  # a frame folder: a clip, not a place to look for more
                dirs.clear()
                sidecars = [folder.parent / f"{folder.name}.txt", folder / "caption.txt"]
                self._add(folder, frames, sidecars, metadata)
            for name in (f for f in files if f.lower().endswith(VIDEO_EXTS)):
                self._add(folder / name, None, [(folder / name).with_suffix(".txt")], metadata)
        if not self.paths:
            raise TsmError(
                f"data folder {self.root} has no clips: put each clip's frames in a subfolder or add .mp4 files"
            )
        if check:
            verdicts = self.check_files(skip_bad)  # first: it can leave clips out of self.paths
            for clip, verdict in zip(self.paths, verdicts, strict=True):
                if "frames" in verdict:  # a video file: now counted
                    self._check_length(clip, verdict["frames"])
        self.warn_empty_captions()

    def _add(
        self, clip: Path, frames: list[Path] | None, sidecars: list[Path], metadata: dict[Path, str]
    ) -> None:
        caption = self._caption("clip", clip, sidecars, metadata)
        if frames is not None:
            self._check_length(clip, len(frames))
        else:
            try:
                import av  # noqa: F401
            except ImportError:
                raise TsmError(
                    f"clip {clip} is a video file but PyAV is not installed; pip install 'tsm[video]' "
                    "or turn it into a folder of frames"
                ) from None
        self.paths.append(clip)
        self.frames.append(frames)
        self.captions.append(caption)

    def _check_length(self, clip: Path, count: int) -> None:
        if count < self.num_frames:
            raise TsmError(
                f"clip {clip} has {count} frames, fewer than num_frames={self.num_frames}; "
                "lower num_frames or remove the clip"
            )

    def files(self, index: int) -> list[Path]:
        return self.frames[index] or [self.paths[index]]

    def decode_all(self, index: int) -> dict[str, Any]:
        """Every frame decoded: a frame folder's files (all of one size), or a video file's frames (counted)."""
        frame_files = self.frames[index]
        if frame_files is not None:
            sizes = set()
            for path in frame_files:
                try:
                    sizes.add(_rgb(path.read_bytes()).size)
                except _IMAGE_ERRORS as e:
                    raise _Unreadable(f"frame {path.name}: {_reason(e)}") from None
            if len(sizes) > 1:
                raise _Unreadable("frames of different sizes")
            return {}
        import av

        try:
            with av.open(str(self.paths[index])) as container:
                count = sum(1 for _ in container.decode(video=0))
        except IndexError:
            raise _Unreadable("no video stream") from None
        except (av.error.FFmpegError, OSError) as e:
            raise _Unreadable(_reason(e)) from None
        return {"frames": count}

    def _indices(self, count: int) -> list[int]:
        """num_frames evenly spaced frames from the first to the last (distinct since count >= num_frames)."""
        return np.linspace(0, count - 1, self.num_frames).round().astype(int).tolist()

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        clip, frame_files = self.paths[index], self.frames[index]
        digest = hashlib.sha256()
        if frame_files is not None:
            images = []
            for path in (frame_files[i] for i in self._indices(len(frame_files))):
                data = _read_bytes(path)
                digest.update(data)
                images.append(_decode_image(data, path))
        else:
            images = self._decode_video(clip)
            with open(clip, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        if len({image.size for image in images}) > 1:
            raise TsmError(f"clip {clip} has frames of different sizes; resize them all to one size")
        crop = self._crop(images[0].width, images[0].height, index, epoch)
        pixels = torch.stack([to_pixels(image, crop) for image in images], dim=1)  # (3, F, R, R)
        key = f"{digest.hexdigest()}:{self.num_frames}f:{crop.tag}"
        return self._sized(
            {"pixels": pixels, "caption": self.caption_at(index, epoch), "key": key}, images[0], crop
        )

    def _decode_video(self, path: Path) -> list[Image.Image]:
        """The clip's sampled frames, decoding once; twice only when the container miscounts its frames."""
        import av

        def decode(wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
            kept: dict[int, Image.Image] = {}
            count = 0
            with av.open(str(path)) as container:
                for count, frame in enumerate(container.decode(video=0), 1):
                    if count - 1 in wanted:
                        kept[count - 1] = frame.to_image()  # RGB PIL image
            return kept, count

        try:
            with av.open(str(path)) as container:
                count = container.streams.video[0].frames  # from the header; 0 when the container omits it
            wanted = self._indices(count) if count >= self.num_frames else []
            kept, decoded = decode(set(wanted))
            if decoded != count or not wanted:  # header wrong, absent or too short: use the true count
                self._check_length(path, decoded)
                wanted = self._indices(decoded)
                if set(wanted) - kept.keys():
                    kept, _ = decode(set(wanted))
        except (av.error.FFmpegError, IndexError, OSError) as e:
            reason = "no video stream" if isinstance(e, IndexError) else _reason(e)
            raise TsmError(
                f"cannot read video {path} ({reason}); replace it or convert it to a frame folder"
            ) from None
        return [kept[i] for i in wanted]


SIZE_KEYS = {"original_size": "original_sizes", "crop_top_left": "crop_top_lefts"}  # item key -> batch key


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: pixels stacked to (B, 3, [F,] H, W); captions, keys and (where every item has them)
    ``original_sizes`` (h, w) and ``crop_top_lefts`` (top, left) as lists."""
    shapes = sorted({tuple(item["pixels"].shape) for item in items})
    if len(shapes) > 1:
        raise TsmError(
            f"a batch mixes pixel shapes {shapes}; with data.buckets draw every batch from one bucket "
            "(tsm's StepBatches does)"
        )
    batch = {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "captions": [item["caption"] for item in items],
        "keys": [item["key"] for item in items],
    }
    for key, name in SIZE_KEYS.items():
        if all(key in item for item in items):
            batch[name] = [tuple(item[key]) for item in items]
    return batch


# ----------------------------------------------------------------------------------------------------
# caches
# ----------------------------------------------------------------------------------------------------
class LatentCache:
    """Tensors on disk, one safetensors file per (key, model_id, tag); nothing is ever unpickled.

    ``model_id`` names what computed the tensors (model path, revision, subfolder), so a cache folder
    can be shared by models without mixing them up. A file that is missing, truncated, corrupt or
    written for another entry reads as a miss (``get`` returns None) and is rewritten by ``put``.
    """

    def __init__(self, directory: PathLike, model_id: str) -> None:
        self.directory = Path(directory)
        self.model_id = model_id
        self.hits = 0
        self.misses = 0

    def _metadata(self, key: str, tag: str) -> dict[str, str]:
        return {"tsm_cache": CACHE_FORMAT, "model_id": self.model_id, "tag": tag, "key": key}

    def path(self, key: str, tag: str = "") -> Path:
        """Where the entry lives: a sha256 name, in one of 256 subfolders to keep folders small."""
        name = hashlib.sha256("\0".join((self.model_id, tag, key)).encode()).hexdigest()
        return self.directory / name[:2] / f"{name}.safetensors"

    def get(self, key: str, tag: str = "") -> dict[str, torch.Tensor] | None:
        path = self.path(key, tag)
        if path.is_file():
            try:
                metadata, tensors = _open(path, read_tensors=True)
            except TsmError as e:  # a crash mid-write elsewhere, a full disk: recompute, never stop training
                log.warning("ignoring cache file: %s", e)
            else:
                if metadata == self._metadata(key, tag):  # also rules out a (vanishingly unlikely) collision
                    self.hits += 1
                    return tensors
        self.misses += 1
        return None

    def put(self, key: str, tag: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store the entry (atomically: readers see the old file or the new one) and return ``tensors``."""
        _atomic_save(tensors, self.path(key, tag), self._metadata(key, tag))
        return tensors


def text_cache_tag(caption: str, expert_index: int | Sequence[int] | None, model_id: str) -> str:
    """The cache key of one caption's text embeddings: ``cache.get(text_cache_tag(...))``.

    Only cache text embeddings while the text encoder is frozen. When it carries (frozen) experts its
    output depends on the expert, so pass the expert index the embedding was computed with (an int, or
    one index per scale), and let ``model_id`` name the encoder and the expert weights loaded into it.
    ``None`` means the encoder has no experts.
    """
    if expert_index is None:
        expert = "shared"
    elif isinstance(expert_index, int):
        expert = f"expert{expert_index}"
    else:
        expert = "expert" + "_".join(str(int(i)) for i in expert_index)
    digest = hashlib.sha256(f"{model_id}\0{caption}".encode()).hexdigest()
    return f"text:{expert}:{digest}"


@torch.no_grad()
def cached_latent_dist(
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    pixels: torch.Tensor,
    keys: Sequence[str],
    cache: LatentCache | None,
    tag: str = "vae",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution for a batch, encoding only what the cache lacks.

    ``encode(pixels) -> (mean, std)`` runs the VAE (per frame for video). Storing the distribution rather
    than one sample keeps training stochastic: draw ``mean + std * randn`` each step, then apply the
    model's scaling (and shift) factor.
    """
    entries: list[dict[str, torch.Tensor] | None] = [cache.get(k, tag) if cache else None for k in keys]
    missing = [i for i, entry in enumerate(entries) if entry is None]
    if missing:
        mean, std = encode(pixels[missing])
        for row, i in enumerate(missing):
            # clone: a slice would keep the whole batch's storage alive (and be written as such)
            entry = {
                "mean": mean[row].detach().float().cpu().clone(),
                "std": std[row].detach().float().cpu().clone(),
            }
            entries[i] = cache.put(keys[i], tag, entry) if cache else entry
    return torch.stack([e["mean"] for e in entries]), torch.stack(
        [e["std"] for e in entries]
    )  # (B, C, [F,] h, w)


def load_dataset(cfg: DataConfig, video: bool, seed: int = 0) -> CaptionedImageFolder | VideoClipFolder:
    """The dataset a config names: an image folder (square crops, or ``data.buckets``), or a folder of clips
    for video models; its crops, flips, tag order and caption dropout are drawn from (``seed``: the run's,
    epoch, index). Every file is decoded once here (`check_files`; ``data.skip_bad`` leaves bad ones out)."""
    if not cfg.path:
        raise TsmError("data.path is empty: give a folder of images with captions (or of video clips)")
    common = dict(
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        caption_dropout=cfg.caption_dropout,
        seed=seed,
        instance_prompt=cfg.instance_prompt,
        trigger=cfg.trigger,
        shuffle_tags=cfg.shuffle_tags,
        keep_tokens=cfg.keep_tokens,
        check=True,
        skip_bad=cfg.skip_bad,
    )
    if video:
        if cfg.buckets is not None:
            raise TsmError(
                "data.buckets applies to image folders; video clips are cut to data.resolution squares"
            )
        return VideoClipFolder(cfg.path, num_frames=cfg.num_frames, **common)
    return CaptionedImageFolder(cfg.path, buckets=resolve_buckets(cfg.buckets), **common)


def dataset_item(dataset: Any, index: int, epoch: int) -> dict[str, Any]:
    """``dataset[(index, epoch)]`` for tsm's folders (their draws follow the epoch), else ``dataset[index]``."""
    return dataset[(index, epoch)] if getattr(dataset, "epoch_indexed", False) else dataset[index]


class StepBatches(Sampler):
    """This process's micro-batches of dataset keys for steps ``start ..`` in order: epochs of seeded
    permutations (``randperm`` seeded by seed + epoch) read position by position, so the sample at global
    position p is the same whatever the processes, accumulation or the step a run resumed at.

    With buckets (a dataset with ``item_buckets``) a whole step's global batch comes from one bucket, so
    every micro-batch of every process stacks, whatever the split. An epoch is planned from seed + epoch
    alone: each bucket's items in a seeded order, cut into steps of ``batch`` (the last step of a bucket
    wraps around to its first items, so a bucket smaller than the batch repeats items), and these steps
    shuffled; every epoch has the same number of steps, so step s's batch is a function of (seed, s).

    Keys are ``(index, epoch)`` for datasets with ``epoch_indexed`` (crops, flips and caption dropout then
    change every epoch, also inside DataLoader workers), else plain indices.
    """

    def __init__(
        self, dataset: Any, seed: int, start: int, total: int, batch: int, micro: int, local: int, rank: int
    ) -> None:
        self.n, self.seed, self.start, self.total = len(dataset), seed, start, total
        self.batch, self.micro, self.local, self.rank = batch, micro, local, rank
        self.with_epoch = getattr(dataset, "epoch_indexed", False)
        self.perms: dict[int, torch.Tensor] = {}
        item_buckets = getattr(dataset, "item_buckets", None)
        self.groups: list[torch.Tensor] | None = None  # the items of each non-empty bucket
        if item_buckets is not None:
            self.groups = [
                torch.tensor([i for i, b in enumerate(item_buckets) if b == bucket])
                for bucket in sorted(set(item_buckets))
            ]
            self.steps_per_epoch = sum(math.ceil(len(g) / batch) for g in self.groups)
        self.plans: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return (self.total - self.start) * (self.batch // self.micro)

    def plan(self, epoch: int) -> torch.Tensor:
        """(steps_per_epoch, batch) item indices of one bucketed epoch, each row from one bucket."""
        if epoch not in self.plans:
            g = torch.Generator().manual_seed(self.seed + epoch)
            rows = []
            for members in self.groups or []:
                steps = math.ceil(len(members) / self.batch)
                order = members[torch.randperm(len(members), generator=g)]
                repeats = math.ceil(steps * self.batch / len(members))
                rows.append(order.repeat(repeats)[: steps * self.batch].view(steps, self.batch))
            rows = torch.cat(rows)
            self.plans = {epoch: rows[torch.randperm(len(rows), generator=g)]}  # keep only the current one
        return self.plans[epoch]

    def bucket_key(self, step: int, offset: int) -> Any:
        """The key at ``offset`` in the global batch of ``step`` (bucketed datasets)."""
        epoch = step // self.steps_per_epoch
        index = int(self.plan(epoch)[step % self.steps_per_epoch, offset])
        return (index, epoch) if self.with_epoch else index

    def key(self, position: int) -> Any:
        epoch = position // self.n
        if epoch not in self.perms:
            self.perms = {
                epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            }
        index = int(self.perms[epoch][position % self.n])
        return (index, epoch) if self.with_epoch else index

    def __iter__(self) -> Iterator[list[Any]]:
        for step in range(self.start, self.total):
            for k in range(self.batch // self.micro):
                lo = k * self.micro + self.rank * self.local  # this micro-batch's offset in the step's batch
                if self.groups is not None:
                    yield [self.bucket_key(step, o) for o in range(lo, lo + self.local)]
                else:
                    p = step * self.batch + lo
                    yield [self.key(q) for q in range(p, p + self.local)]


class _Loader(DataLoader):
    """A DataLoader whose workers' TsmErrors arrive as the one line they were raised with: torch re-raises a
    worker's exception as "Caught TsmError in DataLoader worker process 0.\nOriginal Traceback ...
    \ntsm.errors.TsmError: <message>", and that message is what the CLI would print."""

    def __iter__(self) -> Iterator[Any]:
        # the iterator is made here, not on the first next(): making it draws the workers' base seed from
        # torch's global RNG, and a resumed run must draw it at the same point as one that never stopped
        return self._one_line_errors(super().__iter__())

    @staticmethod
    def _one_line_errors(batches: Iterator[Any]) -> Iterator[Any]:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except TsmError as e:
                lines = str(e).strip().splitlines()
                if len(lines) < 2:  # raised in this process: already one line
                    raise
                raise TsmError(re.sub(r"^[\w.]*TsmError: ", "", lines[-1])) from None
            yield batch


def step_loader(
    dataset: Any, cfg: Any, batch: int, micro: int, local: int, rank: int, total: int
) -> Callable[[int], DataLoader]:
    """``loader(start)``: a DataLoader of this process's micro-batches from step ``start`` on, with
    ``data.num_workers`` workers (``cfg`` is the run's Config: its seed and data section)."""

    def loader(start: int) -> DataLoader:
        sampler = StepBatches(dataset, cfg.train.seed, start, total, batch, micro, local, rank)
        workers = cfg.data.num_workers
        return _Loader(
            dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
            prefetch_factor=2 if workers else None, persistent_workers=False,
        )  # fmt: skip

    return loader


# ----------------------------------------------------------------------------------------------------
# bundled data
# ----------------------------------------------------------------------------------------------------
def write_digits_image_folder(root: PathLike, n: int = 100, size: int = 32) -> Path:
    """Write scikit-learn's 8x8 handwritten digits, upsampled to ``size``, as RGB PNGs with .txt captions
    ("a handwritten digit 3"): a small real dataset for tests, demos and the digits benchmark."""
    try:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
    except ImportError:
        raise TsmError("the digits dataset needs scikit-learn; pip install scikit-learn") from None
    digits = load_digits()
    if not 1 <= n <= len(digits.images):
        raise TsmError(f"n must be between 1 and {len(digits.images)} digits, got {n}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # values 0..16, white ink on black
        gray = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # (8, 8)
        image = Image.fromarray(gray).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        image.save(root / f"digit_{i:04d}.png")
        (root / f"digit_{i:04d}.txt").write_text(f"a handwritten digit {digits.target[i]}\n")
    return root
