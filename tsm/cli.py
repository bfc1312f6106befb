"""`tsm <command>`: train, sample, export, info.

    tsm train configs/sd15_foster.yaml train.steps=100 [--resume]
    tsm sample runs/sd15_foster --prompt "a photo of a dog" --seeds 0 1 2 --steps 25
    tsm export runs/sd15_foster --scale 0 --index 3 --out expert.safetensors     (or --all --out DIR)
    tsm export runs/sd15_distill --timesteps 999 749 499 249 --out DIR    (one merged LoRA per step)
    tsm info runs/sd15_foster/unet.safetensors
    tsm bench digits [--full | --few-step]            (or: tsm bench speed)

Bad input (a config typo, a missing folder, a corrupt or mismatched checkpoint) ends with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tsm.errors import TsmError


def _train(args: argparse.Namespace) -> None:
    from tsm.config import load_config
    from tsm.recipes.run import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


def _sample(args: argparse.Namespace) -> None:
    from tsm.images import save_images
    from tsm.recipes.run import guidance_of, load_run, sample_run

    cfg, c = load_run(args.run)
    side = args.resolution or cfg.data.resolution
    size = (args.height or side, args.width or side)  # (height, width); a square passes as its side
    prompts = args.prompt or cfg.train.validation_prompts
    pairs = [(p, s) for p in prompts for s in args.seeds]
    images = sample_run(
        cfg,
        c,
        [p for p, _ in pairs],
        [s for _, s in pairs],
        c.family.default_steps if args.steps is None else args.steps,
        guidance_of(cfg, c) if args.guidance is None else args.guidance,
        size[0] if size[0] == size[1] else size,
    )
    out = Path(args.out or Path(args.run) / "samples")
    names = [f"p{i // len(args.seeds):02d}_seed{s}" for i, (_, s) in enumerate(pairs)]
    grid = save_images(images, out, names, columns=len(args.seeds))
    (out / "prompts.json").write_text(
        json.dumps({n: p for n, (p, _) in zip(names, pairs, strict=True)}, indent=2)
    )
    print(f"wrote {len(names)} images and {grid}")


def _export(args: argparse.Namespace) -> None:
    from tsm import comfyui, io
    from tsm.inject import ATTR
    from tsm.recipes.run import load_run

    if args.comfyui is None and args.out is None:
        raise TsmError("pass --out (a file, or a folder with --all/--timesteps) or --comfyui DIR")
    cfg, c = load_run(args.run)
    name = args.module or c.family.denoiser_subfolder
    modules = c.modules()
    if name not in modules or getattr(modules[name], ATTR, None) is None:
        raise TsmError(f"module {name!r} has no experts in {args.run}; choose from {', '.join(modules)}")
    if args.comfyui is not None:
        _export_comfyui(args, cfg, c)
        return
    # the keys' prefix is the component's name, so that pipe.load_lora_weights puts each LoRA into the part it
    # came from (text_encoder_2, not the first text encoder, which the class alone would suggest)
    if args.timesteps:
        paths = [
            io.export_step_lora(modules[name], t, Path(args.out) / f"t{t:g}.safetensors", prefix=name)
            for t in args.timesteps
        ]
    elif args.all:
        paths = io.export_all_lora(modules[name], args.out, prefix=name)
    else:
        paths = [io.export_lora(modules[name], args.out, scale=args.scale, index=args.index, prefix=name)]
    if args.format != "diffusers":  # renamed in place from the diffusers file, by diffusers' converters
        n_text = len(c.family.text_subfolders)
        for path in paths:
            comfyui.convert_file(path, path, args.format, c.family.name, n_text)
    print(f"wrote {len(paths)} {args.format} LoRA file(s) to {args.out}")


def _export_comfyui(args: argparse.Namespace, cfg: object, c: object) -> None:
    """One ComfyUI LoRA per finest-scale interval of the denoiser, and the API workflow that switches them."""
    from tsm import comfyui
    from tsm.inject import ATTR
    from tsm.recipes.run import guidance_of

    if args.module not in (None, c.family.denoiser_subfolder):
        raise TsmError("--comfyui exports the denoiser's experts; leave out --module")
    side = args.resolution or cfg.data.resolution
    texts = [n for n, m in c.text_encoders.items() if getattr(m, ATTR, None) is not None]
    paths = comfyui.export_run(
        c.denoiser,
        c.family.name,
        dict(c.scheduler.config),
        args.comfyui,
        prefix=c.family.denoiser_subfolder,
        width=side,
        height=side,
        ckpt_name=args.ckpt,
        prompt=(args.prompt or (cfg.train.validation_prompts or [""])[0]),
        negative_prompt=args.negative_prompt,
        steps=c.family.default_steps if args.steps is None else args.steps,
        cfg=guidance_of(cfg, c) if args.guidance is None else args.guidance,
        seed=args.seed,
    )
    print(f"wrote {len(paths) - 1} ComfyUI LoRA files and {paths[-1]}")
    if texts:
        print(f"note: the workflow switches the denoiser only; {', '.join(texts)} experts are not in it")


def _info(args: argparse.Namespace) -> None:
    from tsm import io

    path = Path(args.path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise TsmError(f"{path} holds no .safetensors files")
    for f in files:
        print(io.describe(f))


def _bench(args: argparse.Namespace) -> None:
    if args.name == "digits":
        from tsm.bench.digits import main as digits

        digits(args.rest)
    elif args.name == "digits-fast":
        from tsm.bench.digits_fast import main as digits_fast

        digits_fast(args.rest)
    else:
        from tsm.bench.speed import main as speed

        speed(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsm", description="Timestep LoRA experts for diffusers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="plain LoRA, foster, assemble, distill or glance, from a YAML config (see configs/)"
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="images from a trained run: PNG files and a grid")
    p.add_argument("run", help="a run directory (or one of its checkpoints/step_N)")
    p.add_argument(
        "--prompt", action="append", help="a prompt (repeat for more; default: validation prompts)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument(
        "--steps", type=int, default=None, help="sampler steps (default: the family's; digits: validated)"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance (default: the run's train.guidance_scale, else the family's)",
    )
    p.add_argument("--resolution", type=int, default=None, help="square side (default: data.resolution)")
    p.add_argument("--width", type=int, default=None, help="image width (default: --resolution)")
    p.add_argument("--height", type=int, default=None, help="image height (default: --resolution)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/samples)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export", help="one expert, or every expert, as diffusers LoRA files")
    p.add_argument("run", help="a run directory (or one of its checkpoints/step_N)")
    p.add_argument(
        "--module", default=None, help="unet, transformer, text_encoder, ... (default: the denoiser)"
    )
    p.add_argument("--scale", type=int, default=0, help="0 = the finest scale (the core experts)")
    p.add_argument("--index", type=int, default=0, help="interval index within the scale")
    p.add_argument("--all", action="store_true", help="export every expert into the folder --out")
    p.add_argument(
        "--timesteps",
        type=float,
        nargs="+",
        help="one LoRA per sampling step into the folder --out: every expert active at t, merged into one",
    )
    p.add_argument("--out", default=None, help="the file (or folder, with --all / --timesteps) to write")
    p.add_argument(
        "--format",
        choices=["diffusers", "kohya", "comfyui"],
        default="diffusers",
        help="key names: diffusers/PEFT, kohya (lora_unet_/lora_te_, .alpha), or what ComfyUI maps for the family",
    )
    p.add_argument(
        "--comfyui",
        default=None,
        metavar="DIR",
        help="fostered or t_only runs: one ComfyUI LoRA per interval and workflow_api.json switching them by step",
    )
    p.add_argument("--ckpt", default="model.safetensors", help="--comfyui: the checkpoint file ComfyUI loads")
    p.add_argument(
        "--prompt", default=None, help="--comfyui: the prompt (default: the first validation prompt)"
    )
    p.add_argument("--negative-prompt", default="", help="--comfyui: the negative prompt")
    p.add_argument("--steps", type=int, default=None, help="--comfyui: sampler steps (default: the family's)")
    p.add_argument("--guidance", type=float, default=None, help="--comfyui: cfg (default: as tsm sample)")
    p.add_argument(
        "--resolution", type=int, default=None, help="--comfyui: image side (default: data.resolution)"
    )
    p.add_argument("--seed", type=int, default=0, help="--comfyui: the sampler seed")
    p.set_defaults(func=_export)

    p = sub.add_parser("bench", help="built-in benchmarks: digits (quality), digits-fast (few-step), speed")
    p.add_argument("name", choices=["digits", "digits-fast", "speed"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (--help lists them)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("path", help="a .safetensors file or a folder of them")
    p.set_defaults(func=_info)
    return parser


def _quiet_hub_libraries() -> None:
    """Keep stderr for our progress bar and errors: no per-file loading bars from diffusers/transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_hub_libraries()
        args.func(args)
    except TsmError as e:
        print(f"tsm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tsm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
