"""Training configuration: dataclasses mirrored by the YAML recipes packaged in ``tsm/configs/``.

``load_config("sd15_foster", ["optim.lr=2e-4", "train.steps=100"])`` reads the YAML (a packaged name, as
``tsm configs`` lists them, or a path to a file), applies ``key=value`` overrides (dotted keys, values parsed
as YAML), and checks every key: an unknown key is a one-line error that suggests the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tsm.errors import TsmError
from tsm.models import family_names

FAMILIES = family_names()  # every family registered in tsm/models/
METHODS = ("lora", "foster", "assemble", "distill", "glance")  # = tsm.recipes' registry (tested)
WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")  # diffusers' weighting_scheme names
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)  # fmt: skip
TRACKERS = ("tensorboard", "wandb", "none")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")  # = tsm.optimizers.build_optimizer's


@dataclass
class ModelConfig:
    family: str = "sd15"  # sd15 | sdxl | pixart | sd3 | flux | qwen | video3d | wan | digits
    path: str = ""  # hub id or local folder in diffusers layout (model_index.json + subfolders); digits: "" = built-in
    revision: str | None = None  # hub revision
    prediction_type: str | None = None  # override the scheduler's (epsilon | v_prediction); flow for sd3
    # the denoisers' frozen weights stored in float8_e4m3fn | float8_e5m2, each layer computing in
    # train.mixed_precision's dtype (diffusers' enable_layerwise_casting); None: stored in that dtype
    storage_dtype: str | None = None


@dataclass
class ExpertsConfig:
    scales: list[Any] = field(default_factory=lambda: [8, 1])  # finest first; ignored (=[1]) for method lora
    rank: int = 4  # LoRA rank of every expert
    alpha: float | None = None  # LoRA alpha (None: = rank)
    dropout: float = 0.0  # lora_dropout
    targets: list[str] | None = None  # denoiser modules (None: the family's default)
    text_targets: list[str] | None = None  # text-encoder modules (None: the family's default; []: none)
    router: str = "asymmetric"  # asymmetric | symmetric | z_only | t_only
    shared_rank: int = 0  # > 0: also one full-range LoRA of this rank on every sample (shared + residual)
    routing: str = "hard"  # hard (paper) | smooth: the finest scale's two nearest experts, hat-weighted in t
    # one full-range LoRA (scales [1]) whose rank channels vary with t: dW(t) = s B diag(d(t)) A
    modulation: str = "none"  # none | table: d(t) = 1 + g[bin(t)], g a learned bins x rank table (0 at init)
    modulation_bins: int = 20  # rows of the modulation table: equal bins of [0, T)
    rank_schedule: str = "none"  # none | tlora: the first r(t) ranks on, fewer at high noise (T-LoRA)
    min_rank: int = 1  # tlora: the ranks on at t = T; r(t) = floor((rank - min_rank)(T - t) / T) + min_rank


@dataclass
class DataConfig:
    path: str = ""  # image folder (.txt sidecars or metadata.jsonl) or folder of video clips
    resolution: int = 512  # square side in pixels after resize + crop (and the default sampling size)
    # aspect-ratio buckets instead of squares: [[width, height], ...] (multiples of 8), or a pixel budget
    # (e.g. 1048576) -> sides multiples of 64, area <= budget, aspect <= 4 (tsm.data.make_buckets). None: squares
    buckets: list[Any] | int | None = None
    center_crop: bool = True  # center crop (else random crop)
    random_flip: bool = False  # horizontal flip augmentation
    caption_dropout: float = 0.0  # probability of training on the empty caption (applied last)
    instance_prompt: str | None = None  # DreamBooth: every caption replaced by this prompt
    trigger: str | None = None  # a word put in front of every caption: "trigger, caption"
    shuffle_tags: bool = False  # captions are comma-separated tags: shuffled per item and epoch (seeded)
    keep_tokens: int = 0  # with shuffle_tags: the first k tags stay in place (the trigger counts as one)
    num_frames: int = 16  # frames per clip (video3d)
    cache: bool = True  # cache VAE latents (and frozen text embeddings) on disk
    cache_dir: str | None = None  # default: <output_dir>/cache
    num_workers: int = 0  # DataLoader workers
    # every image/clip is opened once before step 0 (cached by size and mtime); false: a bad file stops the
    # run with the list of every bad file; true: bad files are left out and counted
    skip_bad: bool = False


@dataclass
class OptimConfig:
    # adamw (torch) | adamw8bit (bitsandbytes, CUDA: tsm[bnb]) | prodigy (prodigyopt: tsm[prodigy]) |
    # adafactor (transformers, relative_step / scale_parameter / warmup_init off: it uses lr)
    name: str = "adamw"
    lr: float = 1e-4  # learning rate of the denoiser's adapters (prodigy: a multiplier of its own, ~1.0)
    weight_decay: float = 1e-2  # decoupled weight decay (denoiser; prodigy: see prodigy_decouple)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas (adafactor: ignored)
    eps: float = 1e-8  # Adam epsilon (adafactor: ignored, it keeps its own (1e-30, 1e-3))
    # prodigy only, as diffusers' dreambooth LoRA scripts (--prodigy_*) and prodigyopt's advice for diffusion
    prodigy_d_coef: float = 1.0  # scales prodigy's step-size estimate d (> 1: larger steps)
    prodigy_use_bias_correction: bool = True  # Adam's bias correction of the estimate
    prodigy_safeguard_warmup: bool = True  # keep lr out of d's denominator (safe under lr warm-up)
    prodigy_beta3: float | None = None  # EMA coefficient of d's statistics (None: sqrt(betas[1]))
    prodigy_decouple: bool = True  # AdamW-style decoupled weight decay (False: L2 added to the gradient)
    text_lr: float | None = None  # text-encoder adapters (None: = lr)
    text_weight_decay: float | None = None  # text-encoder adapters (None: = weight_decay)
    max_grad_norm: float | None = 1.0  # per-expert gradient clipping (None: off)
    # diffusers.optimization.get_scheduler: constant | constant_with_warmup | linear | cosine |
    # cosine_with_restarts | polynomial (over train.steps, after warmup_steps of linear warm-up)
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0  # linear warm-up steps (0 with constant_with_warmup: a constant lr)
    lr_num_cycles: int = 1  # cosine_with_restarts: hard restarts
    lr_power: float = 1.0  # polynomial: the decay's power
    ema_decay: float | None = None  # EMA of the adapters (diffusers' EMAModel), saved as the final weights


@dataclass
class ObjectiveConfig:
    # timestep density / loss weighting, diffusers' weighting_scheme: none (uniform) | logit_normal | mode |
    # cosmap | sigma_sqrt. None: the family's reference script's (sd3: logit_normal; the others: none)
    weighting: str | None = None
    logit_mean: float = 0.0  # logit_normal: mean of the normal (diffusers' sign: > 0 favours less noise)
    logit_std: float = 1.0  # logit_normal: its std
    mode_scale: float = 1.29  # mode: the heavy-tail scale
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (epsilon / v-prediction models)
    shift: float | None = None  # flow models: the timestep shift of training t (None: the scheduler's)
    noise_offset: float = 0.0  # offset noise: + noise_offset * N(0, 1) per sample and channel
    # flow models: the loss on x0 = x_t - sigma * pred, i.e. times sigma^2 (train_dreambooth_lora_sd3.py's
    # --precondition_outputs). None: the family's script default (sd3: on; flux, qwen: off)
    precondition_outputs: bool | None = None


@dataclass
class DistillConfig:
    # method distill (TSM section 4.3, DMD2-style). experts.scales: [4] one expert per step, [4, 1] adds a
    # routed full-range context expert (2-stage: train.assemble_steps router updates), [1] the plain-LoRA baseline
    timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])  # the generator's steps
    guidance_scale: float = 3.0  # classifier-free guidance of the real score (the frozen teacher)
    fake_rank: int = 64  # LoRA rank of the fake score (the teacher plus its own LoRA)
    fake_lr: float | None = None  # fake score's learning rate (None: = optim.lr)
    fake_updates: int = 5  # fake-score updates per generator update
    t_min: int = 20  # distribution matching: noise levels drawn in [t_min, t_max)
    t_max: int = 980
    gan_weight: float = 0.0  # > 0: GAN phase, generator loss weight of a head on the fake score's features
    gan_start: int = 0  # generator step at which the GAN phase starts
    gan_disc_weight: float = 1.0  # weight of the head's real/fake loss in the fake-score updates


@dataclass
class GlanceConfig:
    # method glance (arXiv 2512.02899): slow/fast phase experts on an uneven subset of a reference schedule
    reference_steps: int = 50  # the reference schedule (steps are 1-indexed into it)
    slow: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9])  # the slow (semantic) phase's steps
    fast: list[int] = field(default_factory=lambda: [11, 21, 31, 41, 50])  # the fast (detail) phase's steps
    router: bool = False  # also a full-range context LoRA; train.assemble_steps router updates at the end
    max_pairs: int = 1  # image-caption pairs taken from data.path (the paper: 1)


@dataclass
class TrainConfig:
    method: str = "foster"  # lora (plain LoRA, n=1) | foster | assemble | distill | glance
    # assemble: the fostered checkpoint (a run dir or experts .safetensors); lora/foster: a LoRA every expert
    # starts from (Wan 2.2: a folder holding <name>_high_noise / <name>_low_noise.safetensors, one per transformer)
    experts_from: str | None = None
    only_expert: list[int] | None = None  # foster a single expert [scale, index], as the paper ran them
    # Wan 2.2 (two transformers): train the experts of one of them, high | low; the joint run's draws, the
    # other side's samples left out (null: both in one run)
    only_transformer: str | None = None
    # Wan 2.2: the share of each step's samples drawn at t >= the boundary (the high-noise transformer's), the
    # objective's density inside each side (null: the objective's density over [0, T), no share fixed)
    high_noise_fraction: float | None = None
    # Wan 2.2: only the transformer a forward runs keeps its frozen weights on the device, the other waits on
    # the CPU (each step's batch is ordered high-noise first, so a switch is rare)
    offload_inactive: bool = False
    # foster: the first round(fraction x steps) steps train one LoRA on every t (expert s0_i0, all samples
    # routed to it), then it is copied into every expert and each specialises on its interval (0: off)
    warm_start_fraction: float = 0.0
    # assemble: the experts keep training at this lr (their own param group) while the routers learn at
    # optim.lr (None: the experts stay frozen, the paper's assembling)
    assemble_experts_lr: float | None = None
    steps: int = 4000  # optimizer steps (distill: generator updates)
    assemble_steps: int = 0  # distill/glance with a context expert: router-only steps after `steps`
    batch_size: int = 64  # global batch (split over processes and accumulation steps)
    # foster: every expert gets batch_size samples a step, t drawn inside its interval (the paper's n x steps
    # bookkeeping; the global batch is batch_size x experts)
    batch_per_expert: bool = False
    # foster, mixed batches: each expert's step (its lr) times its share of its scale's samples this step x the
    # scale's experts, so an expert that drew fewer samples than its even share steps proportionally less
    share_scaled_lr: bool = False
    grad_accum: int = 1  # gradient accumulation steps
    mixed_precision: str = "no"  # no | bf16 | fp16 (adapters stay float32)
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "runs/train"
    # a fresh run (no --resume) into an output_dir that already holds checkpoints is refused; true: those
    # checkpoints and the run's files are deleted first
    overwrite: bool = False
    checkpoint_every: int = 500  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept
    log_every: int = 10  # steps between tracker scalars (loss, lr, loss per finest interval)
    log_with: str = "tensorboard"  # tensorboard | wandb | none (Accelerator(log_with=...), into <run>/logs)
    validate_every: int = 0  # steps between validation grids (0: only at the end)
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo"])  # []: no grids
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_steps: int = 25  # sampler steps of the validation grid
    # classifier-free guidance of validation grids and `tsm sample` (None: the family's default: its diffusers
    # pipeline's, or for digits the value chosen on validation data)
    guidance_scale: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    glance: GlanceConfig = field(default_factory=GlanceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    return {
        "model": ModelConfig,
        "experts": ExpertsConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "objective": ObjectiveConfig,
        "train": TrainConfig,
        "distill": DistillConfig,
        "glance": GlanceConfig,
    }


def _unknown(key: str) -> TsmError:
    keys = [f"{s}.{f.name}" for s, cls in _section_types().items() for f in dataclasses.fields(cls)]
    if "." not in key:  # a section name, or a bare field name
        keys = [*_section_types(), *keys]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.4)
    if not close:  # a misspelt field name in the right section, or a bare field name
        close = difflib.get_close_matches(
            key.split(".")[-1], [k.split(".")[1] for k in keys], n=1, cutoff=0.6
        )
        close = [k for k in keys if close and k.endswith("." + close[0])][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TsmError(f"unknown config key {key!r}{hint}")


def config_from_dict(d: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown keys with a suggestion."""
    if not isinstance(d, dict):
        raise TsmError(f"a config must be a mapping of sections ({', '.join(_section_types())})")
    sections = {}
    for name, value in d.items():
        cls = _section_types().get(name)
        if cls is None:
            raise _unknown(str(name))
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise TsmError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(cls)
        for k in value:
            if k not in hints:
                raise _unknown(f"{name}.{k}")
        sections[name] = cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in value.items()})
    cfg = Config(**sections)
    validate(cfg)
    return cfg


# string keys whose accepted words YAML 1.1 reads as booleans (`mixed_precision: no` is False)
_YAML_WORDS = {"train.mixed_precision": {False: "no", True: "yes"}}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """YAML 1.1 reads 1e-4 as a string: turn strings into numbers where the field is numeric."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(hint)) if union else {hint}
    if key in _YAML_WORDS and isinstance(value, bool):  # YAML 1.1 reads a bare no/off/yes/on as a bool
        value = _YAML_WORDS[key][value]
    if value is None or type(value) in allowed or Any in allowed:
        return value
    if float in allowed and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if int in allowed and isinstance(value, float) and value.is_integer():
        return int(value)
    if any(typing.get_origin(a) is list for a in allowed) and isinstance(value, list | tuple):
        return list(value)
    names = ", ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise TsmError(f"config key {key!r} must be {names}, got {value!r}")


def validate(cfg: Config) -> None:
    """Cross-field checks; each failure is a one-line TsmError."""
    if cfg.model.family not in FAMILIES:
        raise TsmError(f"model.family must be one of {', '.join(FAMILIES)}, got {cfg.model.family!r}")
    if cfg.train.method not in METHODS:
        raise TsmError(f"train.method must be one of {', '.join(METHODS)}, got {cfg.train.method!r}")
    if cfg.train.method == "assemble" and not cfg.train.experts_from:
        raise TsmError("train.method=assemble needs train.experts_from: the fostered run or its experts file")
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise TsmError(f"train.mixed_precision must be no, bf16 or fp16, got {cfg.train.mixed_precision!r}")
    for key in (
        "steps", "batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every", "validation_steps",
    ):  # fmt: skip
        if getattr(cfg.train, key) < 1:
            raise TsmError(f"train.{key} must be >= 1, got {getattr(cfg.train, key)}")
    if cfg.train.validate_every < 0:
        raise TsmError(
            f"train.validate_every must be >= 0 (0: only at the end), got {cfg.train.validate_every}"
        )
    _validate_numbers(cfg)
    o = cfg.objective
    if o.weighting is not None and o.weighting not in WEIGHTINGS:
        raise TsmError(f"objective.weighting must be one of {', '.join(WEIGHTINGS)}, got {o.weighting!r}")
    if o.logit_std <= 0 or o.noise_offset < 0 or (o.min_snr_gamma is not None and o.min_snr_gamma <= 0):
        raise TsmError("objective.logit_std and min_snr_gamma must be > 0, noise_offset >= 0")
    if o.shift is not None and o.shift <= 0:
        raise TsmError(f"objective.shift must be > 0, got {o.shift}")
    if cfg.optim.lr_scheduler not in LR_SCHEDULERS:
        raise TsmError(
            f"optim.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {cfg.optim.lr_scheduler!r}"
        )
    if cfg.optim.warmup_steps < 0:
        raise TsmError(f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}")
    if cfg.optim.ema_decay is not None and not 0 < cfg.optim.ema_decay < 1:
        raise TsmError(f"optim.ema_decay must be in (0, 1), got {cfg.optim.ema_decay}")
    op = cfg.optim
    if op.name not in OPTIMIZERS:
        raise TsmError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {op.name!r}")
    if op.name == "prodigy" and op.lr < 0.1:  # its steps are d * lr (diffusers warns below 0.1)
        raise TsmError(f"optim.name=prodigy estimates its own step size: set optim.lr=1.0 (got {op.lr})")
    if op.name == "prodigy" and op.text_lr is not None and op.text_lr != op.lr:  # one lr for all its groups
        raise TsmError(f"optim.name=prodigy takes one learning rate: unset optim.text_lr (got {op.text_lr})")
    if op.prodigy_d_coef <= 0 or (op.prodigy_beta3 is not None and not 0 <= op.prodigy_beta3 < 1):
        raise TsmError("optim.prodigy_d_coef must be > 0 and optim.prodigy_beta3 in [0, 1)")
    if cfg.train.log_with not in TRACKERS:
        raise TsmError(f"train.log_with must be one of {', '.join(TRACKERS)}, got {cfg.train.log_with!r}")
    if cfg.data.num_workers < 0:
        raise TsmError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.experts.shared_rank < 0:
        raise TsmError(f"experts.shared_rank must be >= 0 (0: none), got {cfg.experts.shared_rank}")
    if cfg.experts.routing not in ("hard", "smooth"):
        raise TsmError(f"experts.routing must be hard or smooth, got {cfg.experts.routing!r}")
    if cfg.experts.modulation not in ("none", "table"):
        raise TsmError(f"experts.modulation must be none or table, got {cfg.experts.modulation!r}")
    if cfg.experts.rank_schedule not in ("none", "tlora"):
        raise TsmError(f"experts.rank_schedule must be none or tlora, got {cfg.experts.rank_schedule!r}")
    if cfg.experts.modulation_bins < 1:
        raise TsmError(f"experts.modulation_bins must be >= 1, got {cfg.experts.modulation_bins}")
    if not 1 <= cfg.experts.min_rank <= cfg.experts.rank:
        raise TsmError(
            f"experts.min_rank must be in [1, experts.rank={cfg.experts.rank}], got {cfg.experts.min_rank}"
        )
    e = cfg.experts
    if (e.modulation != "none" or e.rank_schedule != "none") and (
        cfg.train.method not in ("lora", "foster")
        or (cfg.train.method == "foster" and list(e.scales) != [1])
        or e.shared_rank
        or e.routing != "hard"
    ):
        raise TsmError(
            "experts.modulation and experts.rank_schedule shape one full-range LoRA: use train.method=lora "
            "(or foster with experts.scales=[1]), no experts.shared_rank and experts.routing=hard"
        )
    _validate_data(cfg)
    if cfg.train.assemble_steps < 0:
        raise TsmError(f"train.assemble_steps must be >= 0, got {cfg.train.assemble_steps}")
    d = cfg.distill
    if cfg.train.method == "distill":
        ts = d.timesteps
        if not ts or any(not 0 <= t <= 1000 for t in ts) or sorted(set(ts), reverse=True) != list(ts):
            raise TsmError(f"distill.timesteps must be distinct and decreasing in [0, 1000], got {ts}")
        if d.fake_updates < 1 or d.fake_rank < 1:
            raise TsmError("distill.fake_updates and distill.fake_rank must be >= 1")
        if not 0 <= d.t_min < d.t_max <= 1000:
            raise TsmError(f"distill needs 0 <= t_min < t_max <= 1000, got {d.t_min}, {d.t_max}")
    if cfg.train.method == "glance" and cfg.glance.max_pairs < 1:
        raise TsmError(f"glance.max_pairs must be >= 1, got {cfg.glance.max_pairs}")
    if cfg.train.method in ("distill", "glance"):
        if cfg.experts.text_targets:
            raise TsmError(
                f"train.method={cfg.train.method} tunes the denoiser only; set experts.text_targets=[]"
            )
        if cfg.train.mixed_precision == "fp16":
            raise TsmError(
                f"train.method={cfg.train.method} runs in float32 or bf16; set train.mixed_precision=bf16"
            )
    if cfg.train.assemble_steps and cfg.train.method == "distill" and len(cfg.experts.scales) < 2:
        raise TsmError("train.assemble_steps needs a context expert: experts.scales such as [4, 1]")
    if cfg.train.assemble_steps and cfg.train.method == "glance" and not cfg.glance.router:
        raise TsmError("train.assemble_steps needs glance.router=true (a context expert to route)")
    if cfg.model.storage_dtype not in (None, "float8_e4m3fn", "float8_e5m2"):
        raise TsmError(
            f"model.storage_dtype must be float8_e4m3fn, float8_e5m2 or null, got {cfg.model.storage_dtype!r}"
        )
    if cfg.train.only_transformer not in (None, "high", "low"):
        raise TsmError(
            f"train.only_transformer must be high, low or null (both), got {cfg.train.only_transformer!r}"
        )
    frac = cfg.train.high_noise_fraction
    if frac is not None and not 0 < frac < 1:
        side = "high-noise" if frac is not None and frac <= 0 else "low-noise"
        raise TsmError(
            f"train.high_noise_fraction must be in (0, 1): {frac} leaves the {side} transformer no samples "
            "(train.only_transformer trains one side)"
        )
    if cfg.train.only_expert is not None and len(cfg.train.only_expert) != 2:
        raise TsmError(f"train.only_expert must be [scale, index], got {cfg.train.only_expert!r}")
    tc = cfg.train
    if not 0 <= tc.warm_start_fraction < 1:
        raise TsmError(f"train.warm_start_fraction must be in [0, 1), got {tc.warm_start_fraction}")
    if tc.warm_start_fraction > 0:
        if tc.method != "foster" or tc.only_expert is not None:
            raise TsmError(
                "train.warm_start_fraction needs train.method=foster with every expert (no only_expert); "
                "set it to 0"
            )
        warm = round(tc.warm_start_fraction * tc.steps)
        if not 0 < warm < tc.steps:
            raise TsmError(
                f"train.warm_start_fraction={tc.warm_start_fraction} of {tc.steps} steps gives {warm} warm "
                "steps; choose a fraction that leaves at least one warm and one specialising step"
            )
    if tc.share_scaled_lr and (
        tc.method != "foster" or tc.batch_per_expert or tc.only_expert is not None or tc.warm_start_fraction
    ):
        raise TsmError(
            "train.share_scaled_lr scales each expert's step by its share of a mixed batch: it needs "
            "train.method=foster with train.batch_per_expert=false, no only_expert and no warm start"
        )
    if tc.share_scaled_lr and cfg.experts.routing != "hard":
        raise TsmError(
            "train.share_scaled_lr needs experts.routing=hard (smooth routing trains the finest scale on one "
            "shared mean)"
        )
    if tc.assemble_experts_lr is not None:
        if tc.method != "assemble":
            raise TsmError(
                f"train.assemble_experts_lr applies to train.method=assemble (got {tc.method}; glance and "
                "distill keep their experts frozen when they assemble); remove it"
            )
        if tc.assemble_experts_lr <= 0:
            raise TsmError(f"train.assemble_experts_lr must be > 0 (or unset), got {tc.assemble_experts_lr}")


def _validate_numbers(cfg: Config) -> None:
    """Learning rates, ranks, sizes: values that train nothing or crash deep inside torch, refused here."""
    op, e, d = cfg.optim, cfg.experts, cfg.data
    for key in ("lr", "text_lr", "fake_lr"):
        value = getattr(cfg.distill if key == "fake_lr" else op, key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            section = "distill" if key == "fake_lr" else "optim"
            raise TsmError(f"{section}.{key} must be a positive number, got {value}")
    for key in ("weight_decay", "text_weight_decay"):
        value = getattr(op, key)
        if value is not None and not value >= 0:
            raise TsmError(f"optim.{key} must be >= 0, got {value}")
    if op.max_grad_norm is not None and not op.max_grad_norm > 0:
        raise TsmError(f"optim.max_grad_norm must be > 0 (or null: no clipping), got {op.max_grad_norm}")
    if e.rank < 1:
        raise TsmError(f"experts.rank must be >= 1, got {e.rank}")
    if e.alpha is not None and not e.alpha > 0:
        raise TsmError(f"experts.alpha must be > 0 (or null: = rank), got {e.alpha}")
    if not 0 <= e.dropout < 1:
        raise TsmError(f"experts.dropout must be in [0, 1), got {e.dropout}")
    if d.resolution < 1:
        raise TsmError(f"data.resolution must be a positive number of pixels, got {d.resolution}")
    if not 0 <= d.caption_dropout <= 1:
        raise TsmError(f"data.caption_dropout must be in [0, 1], got {d.caption_dropout}")


def _validate_data(cfg: Config) -> None:
    """data.buckets, trigger, tags: each failure a one-line TsmError."""
    d, b = cfg.data, cfg.data.buckets
    if isinstance(b, bool) or (isinstance(b, int) and b < 64 * 64):
        raise TsmError(f"data.buckets as a pixel budget must be >= 4096 (one 64x64 bucket), got {b!r}")
    if isinstance(b, list):
        pairs = [tuple(p) if isinstance(p, list | tuple) else (p,) for p in b]
        ok = [len(p) == 2 and all(type(v) is int and v >= 8 and v % 8 == 0 for v in p) for p in pairs]
        if not b or not all(ok) or len(set(pairs)) != len(pairs):
            raise TsmError(
                f"data.buckets must be distinct [width, height] pairs, multiples of 8, e.g. [[512, 512], "
                f"[640, 384]], or a pixel budget such as 262144; got {b!r}"
            )
    if b is not None and cfg.train.method in ("distill", "glance"):
        raise TsmError(
            f"data.buckets works with lora/foster/assemble; train.method={cfg.train.method} draws its own "
            "samples: leave data.buckets unset"
        )
    for key in ("instance_prompt", "trigger"):
        if getattr(d, key) is not None and not str(getattr(d, key)).strip():
            raise TsmError(f"data.{key} is empty; give the prompt or word, or leave it unset")
    if d.keep_tokens < 0 or (d.keep_tokens and not d.shuffle_tags):
        raise TsmError(
            f"data.keep_tokens={d.keep_tokens} keeps tags in place while shuffling: set data.shuffle_tags=true"
        )


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise TsmError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


# the YAML recipes, shipped in the wheel (pyproject.toml package-data)
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the packaged configs, sorted: ``sd15_foster`` for tsm/configs/sd15_foster.yaml, and
    ``accelerate/fsdp`` for the accelerate launcher's config."""
    return sorted(
        p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix() for p in PACKAGED_CONFIGS.rglob("*.yaml")
    )


def packaged_config(name: str) -> Path:
    """The YAML file of a packaged config (``sd15_foster`` -> tsm/configs/sd15_foster.yaml)."""
    if name in packaged_configs():
        return PACKAGED_CONFIGS / f"{name}.yaml"
    names = [n for n in packaged_configs() if "/" not in n]  # the training recipes
    raise TsmError(f"no config file or packaged config named {name!r}; packaged: {', '.join(names)}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``key=value`` overrides.

    ``path`` is a file, or a packaged config's name: a bare name (no ``.yaml``, no folder) that is no file."""
    d: dict[str, Any] = {}
    if path is not None:
        name = str(path)
        path = Path(path)
        bare = "/" not in name and "\\" not in name and not name.endswith((".yaml", ".yml"))
        if not path.is_file() and bare:
            path = packaged_config(name)
        if not path.is_file():
            raise TsmError(f"config file {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise TsmError(f"config file {path} is not valid YAML{where}") from None
    for item in overrides or []:
        keys, value = _parse_override(item)
        if len(keys) != 2:
            raise _unknown(".".join(keys))
        d.setdefault(keys[0], {})
        if not isinstance(d[keys[0]], dict):
            raise _unknown(".".join(keys))
        d[keys[0]][keys[1]] = value
    return config_from_dict(d)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
