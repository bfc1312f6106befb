"""Image and video folders with captions, an on-disk cache of latents and text embeddings, bundled digits.

Folders follow the diffusers / kohya conventions, so a dataset prepared for their scripts works unchanged:

    photos/                          clips/
      a.png   a.txt                    walk/00001.png 00002.png ...   walk.txt   (or walk/caption.txt)
      sub/b.jpg                        run.mp4   run.txt
      metadata.jsonl                   metadata.jsonl
    {"file_name": "sub/b.jpg", "text": "a red bicycle"}     (one JSON object a line; "caption" works too)

A ``.txt`` sidecar wins over ``metadata.jsonl``. Every random choice (crop, flip, caption dropout) is drawn
from ``(seed, epoch, index)``, so a resumed run sees the same samples as one that never stopped. The epoch
can travel with the index (``dataset[(index, epoch)]``, what `step_loader` asks for, so DataLoader workers
need no epoch of their own), or be set with ``dataset.set_epoch(e)`` before a plain ``dataset[index]``.

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

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from tsm.config import DataConfig
from tsm.errors import TsmError
from tsm.io import _atomic_save, _open

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm")  # anything PyAV decodes; mp4 is the usual one
CAPTION_KEYS = ("text", "caption")  # metadata.jsonl columns: diffusers' default, then kohya's name
CACHE_FORMAT = "1"  # tsm_cache in a cache file's metadata; bump when what is stored changes
# independent random streams per item, so turning one augmentation on never changes the others' draws
_CROP, _FLIP, _DROPOUT = 0, 1, 2

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


def _decode_image(data: bytes, path: Path) -> Image.Image:
    """RGB image from file bytes; PIL decodes lazily, so load inside the try to catch truncated files too."""
    try:
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
        return image.convert("RGB")  # also forces the decode
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TsmError(f"cannot read image {path} ({reason}); replace or delete the file") from None


@dataclass(frozen=True)
class Crop:
    """Where one item's square comes from: resize to (width, height), cut at (left, top), maybe mirror."""

    width: int
    height: int
    left: int
    top: int
    size: int
    flip: bool

    @property
    def tag(self) -> str:  # part of the item key: the same file cut differently is a different latent
        return f"{self.width}x{self.height}+{self.left}+{self.top}/{self.size}{'/flip' if self.flip else ''}"


def to_pixels(image: Image.Image, crop: Crop) -> torch.Tensor:
    """Resize, crop and flip an RGB image into a float32 tensor (3, size, size) in [-1, 1]."""
    if image.size != (crop.width, crop.height):
        # LANCZOS anti-aliases when shrinking; BICUBIC rings less when enlarging
        shrink = crop.width < image.width
        resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
        image = image.resize((crop.width, crop.height), resample=resample)
    image = image.crop((crop.left, crop.top, crop.left + crop.size, crop.top + crop.size))
    if crop.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)


# ----------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------
class _CaptionedFolder(Dataset):
    """What image and video folders share: arguments, seeded draws, caption dropout, crop choice."""

    kind = "images"

    def __init__(
        self,
        root: PathLike,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        caption_dropout: float,
        seed: int,
    ) -> None:
        if resolution < 1:
            raise TsmError(f"resolution must be >= 1, got {resolution}")
        if seed < 0:
            raise TsmError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise TsmError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
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
        self.epoch = 0
        self.paths: list[Path] = []
        self.captions: list[str] = []

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
        return self.item(int(index), int(epoch))

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        raise NotImplementedError

    def _rng(self, index: int, stream: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index, stream])

    def caption_at(self, index: int, epoch: int | None = None) -> str:
        """The caption item ``index`` gets in ``epoch`` (default: the current one): "" with probability
        caption_dropout. This is the only place training drops captions (classifier-free guidance)."""
        if self.caption_dropout > 0 and self._rng(index, _DROPOUT, epoch).random() < self.caption_dropout:
            return ""
        return self.captions[index]

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

    def _crop(self, width: int, height: int, index: int, epoch: int | None = None) -> Crop:
        """Shorter side to resolution (the other keeps the aspect ratio), then a center or seeded crop."""
        size = self.resolution
        scale = size / min(width, height)
        w, h = max(size, round(width * scale)), max(size, round(height * scale))
        if self.center_crop:  # rounding as torchvision's CenterCrop, which diffusers' scripts use
            left, top = round((w - size) / 2), round((h - size) / 2)
        else:
            rng = self._rng(index, _CROP, epoch)
            left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        flip = self.random_flip and bool(self._rng(index, _FLIP, epoch).random() < 0.5)
        return Crop(w, h, left, top, size, flip)


class CaptionedImageFolder(_CaptionedFolder):
    """Images found recursively below ``root``, each with a caption; items are
    ``{"pixels": (3, R, R) float32 in [-1, 1], "caption": str, "key": str}``.

    Captions are checked when the folder is opened (a missing one is an error naming the image);
    images are decoded only when loaded, and a corrupt one is an error naming its file.
    """

    def __init__(
        self,
        root: PathLike,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, resolution, center_crop, random_flip, caption_dropout, seed)
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

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        path = self.paths[index]
        data = _read_bytes(path)
        image = _decode_image(data, path)
        crop = self._crop(image.width, image.height, index, epoch)
        key = f"{hashlib.sha256(data).hexdigest()}:{crop.tag}"
        return {"pixels": to_pixels(image, crop), "caption": self.caption_at(index, epoch), "key": key}


class VideoClipFolder(_CaptionedFolder):
    """Clips below ``root``: folders of frame images (in name order) or video files read with PyAV.
    Items are ``{"pixels": (3, F, R, R) float32 in [-1, 1], "caption", "key"}`` with F = num_frames
    evenly spaced frames, all cut the same way.

    A folder clip's caption is ``<clip>.txt`` next to it or ``caption.txt`` inside it; a video file's is
    ``<clip>.txt``; either can instead have a metadata.jsonl line. Frame folders are counted when the
    dataset is opened; a video file's frames only when it is decoded.
    """

    kind = "video clips (frame folders or .mp4 files)"

    def __init__(
        self,
        root: PathLike,
        resolution: int,
        num_frames: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(root, resolution, center_crop, random_flip, caption_dropout, seed)
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
        return {"pixels": pixels, "caption": self.caption_at(index, epoch), "key": key}

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
            reason = str(e).splitlines()[0] if str(e) else "no video stream"
            raise TsmError(
                f"cannot read video {path} ({reason}); replace it or convert it to a frame folder"
            ) from None
        return [kept[i] for i in wanted]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: pixels stacked to (B, 3, [F,] R, R); captions and keys as lists."""
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "captions": [item["caption"] for item in items],
        "keys": [item["key"] for item in items],
    }


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
    """The dataset a config names: an image folder, or a folder of clips for video models; its crops, flips
    and caption dropout are drawn from (``seed``: the run's, epoch, index)."""
    if not cfg.path:
        raise TsmError("data.path is empty: give a folder of images with captions (or of video clips)")
    common = dict(
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        caption_dropout=cfg.caption_dropout,
        seed=seed,
    )
    if video:
        return VideoClipFolder(cfg.path, num_frames=cfg.num_frames, **common)
    return CaptionedImageFolder(cfg.path, **common)


def dataset_item(dataset: Any, index: int, epoch: int) -> dict[str, Any]:
    """``dataset[(index, epoch)]`` for tsm's folders (their draws follow the epoch), else ``dataset[index]``."""
    return dataset[(index, epoch)] if getattr(dataset, "epoch_indexed", False) else dataset[index]


class StepBatches(Sampler):
    """This process's micro-batches of dataset keys for steps ``start ..`` in order: epochs of seeded
    permutations (``randperm`` seeded by seed + epoch) read position by position, so the sample at global
    position p is the same whatever the processes, accumulation or the step a run resumed at.

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

    def __len__(self) -> int:
        return (self.total - self.start) * (self.batch // self.micro)

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
                lo = step * self.batch + k * self.micro + self.rank * self.local
                yield [self.key(p) for p in range(lo, lo + self.local)]


def step_loader(
    dataset: Any, cfg: Any, batch: int, micro: int, local: int, rank: int, total: int
) -> Callable[[int], DataLoader]:
    """``loader(start)``: a DataLoader of this process's micro-batches from step ``start`` on, with
    ``data.num_workers`` workers (``cfg`` is the run's Config: its seed and data section)."""

    def loader(start: int) -> DataLoader:
        sampler = StepBatches(dataset, cfg.train.seed, start, total, batch, micro, local, rank)
        workers = cfg.data.num_workers
        return DataLoader(
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
