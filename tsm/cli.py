"""`tsm <command>`: train, sample, export, info, configs, bench.

    tsm train sd15_foster model.path=runwayml/stable-diffusion-v1-5 data.path=my_images/ [--resume]
    tsm sample runs/sd15_foster --prompt "a photo of a dog" --seeds 0 1 2 --steps 25
    tsm export runs/sd15_foster --scale 0 --index 3 --out expert.safetensors     (or --all --out DIR)
    tsm export runs/sd15_distill --timesteps 999 749 499 249 --out DIR    (one merged LoRA per step)
    tsm info runs/sd15_foster/unet.safetensors
    tsm configs                          (the packaged configs; tsm configs sd15_foster > my.yaml to edit one)
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
    import shlex

    from tsm.config import load_config
    from tsm.recipes.run import train
    from tsm.rundir import Stopped

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg, resume=args.resume)
    except Stopped as e:  # SIGTERM: a checkpoint was written; exit as the signal would have (143)
        again = shlex.join(["tsm", "train", str(args.config), *args.overrides, "--resume"])
        if e.main_process:  # one line, not one per process
            print(
                f"tsm train: stopped by {e.signal_name} after step {e.step}; checkpoint {e.checkpoint} "
                f"written; continue with: {again}",
                file=sys.stderr,
            )
        raise SystemExit(128 + e.signum) from None
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


def _sample(args: argparse.Namespace) -> None:
    import math

    import torch

    from tsm.errors import shorten
    from tsm.images import save_images
    from tsm.recipes.run import CHECKPOINTS, guidance_of, load_run, sample_run
    from tsm.sampling import with_trigger

    # the flags first: a typo is reported before the model loads
    if args.steps is not None and args.steps < 1:
        raise TsmError(f"--steps must be at least 1, got {args.steps}")
    if not args.seeds:
        raise TsmError("--seeds needs at least one seed, e.g. --seeds 0 1 2 3")
    if bad := [s for s in args.seeds if not 0 <= s < 2**64]:
        raise TsmError(f"--seeds must be whole numbers from 0 to 2**64 - 1, got {bad[0]}")
    if len(set(args.seeds)) != len(args.seeds):
        twice = next(s for s in args.seeds if args.seeds.count(s) > 1)
        raise TsmError(f"--seeds has {twice} twice; give distinct seeds (each names its image file)")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise TsmError(f"--guidance must be a finite number >= 0 (<= 1: no guidance), got {args.guidance}")
    for flag in ("resolution", "width", "height"):
        if getattr(args, flag) is not None and getattr(args, flag) < 8:
            raise TsmError(f"--{flag} must be at least 8 pixels, got {getattr(args, flag)}")

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise TsmError(
            f"--device {shorten(args.device)!r} is not a device; use cuda, cuda:1 or cpu"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TsmError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")

    if args.guidance_2 is not None and not (math.isfinite(args.guidance_2) and args.guidance_2 >= 0):
        raise TsmError(f"--guidance-2 must be a finite number >= 0, got {args.guidance_2}")
    cfg, c = load_run(args.run, device)
    if args.guidance_2 is not None:
        if "boundary_timestep" not in c.extra:
            raise TsmError(
                "--guidance-2 is the low-noise transformer's guidance of a Wan 2.2 run; leave it out"
            )
        c.extra["guidance_scale_2"] = args.guidance_2
    side = args.resolution or cfg.data.resolution
    size = (args.height or side, args.width or side)  # (height, width); a square passes as its side
    asked = any(v is not None for v in (args.resolution, args.width, args.height))
    if asked and not hasattr(c.vae, "config"):  # pixel space (digits): the image is the latent's size
        drawn = tuple(c.family.latent_shape(c, side, cfg.data.num_frames)[-2:])
        if size != drawn:
            raise TsmError(
                f"the {c.family.name} family draws {drawn[0]}x{drawn[1]} images only; leave out --resolution, "
                "--width and --height"
            )
    prompts = args.prompt or cfg.train.validation_prompts
    if not prompts:
        raise TsmError(f"{args.run} has no train.validation_prompts; pass --prompt (repeat for more)")
    if cfg.data.trigger and not args.no_trigger:
        prompts = with_trigger(prompts, cfg.data.trigger)
        print(f"prompts get the run's trigger {shorten(cfg.data.trigger)!r} (--no-trigger: as given)")
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
    if args.out is not None:
        out = Path(args.out)
    else:  # a new folder per call, next to the validation grids: earlier samples are never overwritten
        path = Path(args.run)
        root = (path.parent.parent if path.parent.name == CHECKPOINTS else path) / "samples"
        taken = [int(p.name[7:]) for p in root.glob("sample_*") if p.name[7:].isdigit()]
        k = max(taken, default=-1) + 1
        while True:
            out = root / f"sample_{k:03d}"
            try:
                out.mkdir(parents=True)
                break
            except FileExistsError:  # another call took it meanwhile
                k += 1
    names = [f"p{i // len(args.seeds):02d}_seed{s}" for i, (_, s) in enumerate(pairs)]
    save_images(images, out, names, columns=len(args.seeds))
    (out / "prompts.json").write_text(
        json.dumps({n: p for n, (p, _) in zip(names, pairs, strict=True)}, indent=2)
    )
    print(f"wrote {len(names)} images, grid.png and prompts.json to {out}")


def _export(args: argparse.Namespace) -> None:
    from tsm import comfyui, io
    from tsm.inject import ATTR, get_routing
    from tsm.recipes.run import load_run

    if args.comfyui is None and args.out is None:
        raise TsmError("pass --out (a file, or a folder with --all/--timesteps) or --comfyui DIR")
    cfg, c = load_run(args.run)
    family, denoiser = c.family, c.family.denoiser_subfolder
    name = args.module or denoiser
    modules = c.modules()
    if len(family.part_labels) > 1 and family.part_labels.keys() <= modules.keys() and not args.module:
        if args.comfyui is not None:
            _export_comfyui_pair(args, cfg, c)
        else:
            _export_pair(args, c)
        return
    if name not in modules or getattr(modules[name], ATTR, None) is None:
        raise TsmError(f"module {name!r} has no experts in {args.run}; choose from {', '.join(modules)}")
    if args.comfyui is not None:
        _export_comfyui(args, cfg, c)
        return
    # without --module one file carries the whole model: the denoiser's expert and the text encoders' expert of
    # the same interval, each under its component name (pipe.load_lora_weights / kohya's loaders split them)
    if args.module:
        parts = {name: modules[name]}
    else:
        parts = {n: m for n, m in modules.items() if getattr(m, ATTR, None) is not None}
    if args.format == "kohya" and denoiser in parts and denoiser not in comfyui.KOHYA_COMPONENTS:
        raise TsmError(
            f"kohya names here cover SD1.5/SDXL UNets and CLIP text encoders, not the {family.name} {denoiser}; "
            "export with --format diffusers (or comfyui)"
        )
    left = [n for n in parts if n != denoiser and n not in comfyui.text_parts(args.format, family.name)]
    if left and not args.module:
        print(
            f"note: left out the {', '.join(left)} experts: {args.format} names for the {family.name} family's "
            "text encoders are not defined (A1111/kohya name SD1.5/SDXL CLIP encoders only); export them with "
            "--format diffusers --module NAME"
        )
        parts = {n: m for n, m in parts.items() if n not in left}
    out = Path(args.out)
    if args.timesteps:
        jobs = ((io.step_lora_state(parts, t), out / f"t{t:g}.safetensors") for t in args.timesteps)
    elif args.all:
        counts = get_routing(modules[name]).spec.experts_per_scale
        jobs = (
            (io.lora_state(parts, s, i), out / f"expert_s{s}_i{i}.safetensors")
            for s, n in enumerate(counts)
            for i in range(n)
        )
    else:
        jobs = iter([(io.lora_state(parts, args.scale or 0, args.index or 0), out)])
    n_text = len(family.text_subfolders)  # kohya's lora_te_ (one) or lora_te1_/lora_te2_ (two or more)
    paths = [comfyui.save_as(state, path, args.format, family.name, n_text) for state, path in jobs]
    print(f"wrote {len(paths)} {args.format} LoRA file(s) with {' + '.join(parts)} experts to {args.out}")


def _pair_name(args: argparse.Namespace) -> str:
    """``--name``, else the run directory's name (a checkpoint's run: its parent's parent)."""
    from tsm.recipes.run import CHECKPOINTS

    path = Path(args.run).resolve()
    return args.name or (path.parent.parent if path.parent.name == CHECKPOINTS else path).name


def _export_pair(args: argparse.Namespace, c: object) -> None:
    """Wan 2.2: each transformer's experts as their own LoRA files, ``<name>[_s<s>_i<i>]_high_noise`` and
    ``..._low_noise.safetensors`` (ai-toolkit's suffixes), each keyed ``transformer.`` as
    ``WanPipeline.load_lora_weights(path)`` / ``(path, load_into_transformer_2=True)`` read them."""
    import torch

    from tsm import comfyui, io
    from tsm.inject import ATTR, get_routing

    if args.out is None:
        raise TsmError("pass --out DIR: the folder for the <name>_high_noise / <name>_low_noise files")
    out, name, modules = Path(args.out), _pair_name(args), c.modules()
    if out.suffix == ".safetensors":
        raise TsmError(f"--out {out} is a file name; a Wan 2.2 run exports two or more files: pass a folder")
    if args.format == "kohya":
        raise TsmError("kohya names cover SD1.5/SDXL; export Wan 2.2 with --format diffusers or comfyui")
    jobs = []
    for part, label in c.family.part_labels.items():
        model = modules[part]
        if getattr(model, ATTR, None) is None:
            continue  # train.only_transformer: the other side has no experts
        one = {"transformer": model}  # both files keyed transformer.: the pipeline picks the transformer
        counts = get_routing(model).spec.experts_per_scale
        start = len(jobs)
        if args.timesteps:
            for t in args.timesteps:
                if c.family.denoiser_parts(c, torch.tensor([float(t)]))[part].item():
                    jobs.append((io.step_lora_state(one, t), out / f"{name}_t{t:g}_{label}.safetensors"))
        elif args.scale is not None or args.index is not None:
            s, i = args.scale or 0, args.index or 0
            jobs.append((io.lora_state(one, s, i), out / f"{name}_s{s}_i{i}_{label}.safetensors"))
        elif list(counts) == [1]:  # one LoRA per transformer: the pair
            jobs.append((io.lora_state(one, 0, 0), out / f"{name}_{label}.safetensors"))
        else:  # every interval of the finest scale (--all: of every scale)
            scales = range(len(counts)) if args.all else [0]
            jobs += [
                (io.lora_state(one, s, i), out / f"{name}_s{s}_i{i}_{label}.safetensors")
                for s in scales
                for i in range(counts[s])
            ]
        for state, _ in jobs[start:]:  # which transformer the file is for (tsm.import_lora checks it)
            state[1]["tsm_component"] = part
    paths = [comfyui.save_as(state, path, args.format, c.family.name) for state, path in jobs]
    print(f"wrote {len(paths)} {args.format} LoRA file(s) to {out}: {', '.join(p.name for p in paths)}")


def _workflow_settings(args: argparse.Namespace, cfg: object, c: object) -> tuple[str, int, float]:
    """A ComfyUI workflow's prompt (the first validation prompt by default, with the run's trigger in front, as
    `tsm sample` prompts the run), sampler steps and cfg (the family's / the run's, as `tsm sample`)."""
    from tsm.recipes.run import guidance_of
    from tsm.sampling import with_trigger

    prompt = args.prompt if args.prompt is not None else (cfg.train.validation_prompts or [""])[0]
    steps = c.family.default_steps if args.steps is None else args.steps
    guidance = guidance_of(cfg, c) if args.guidance is None else args.guidance
    return with_trigger([prompt], cfg.data.trigger)[0], steps, guidance


def _export_comfyui_pair(args: argparse.Namespace, cfg: object, c: object) -> None:
    """Wan 2.2: each transformer's LoRA files in ComfyUI's names (one per interval of its finest scale) and the
    two-sampler workflow: KSamplerAdvanced on the high-noise model until t crosses the boundary, then on the
    low-noise model, for the workflow's own schedule and step count."""
    from tsm import comfyui, io
    from tsm.inject import ATTR, get_routing

    files = dict(comfyui.WAN22_FILES)
    # --ckpt HIGH,LOW: the two diffusion models as ComfyUI's models/diffusion_models/ lists them
    if args.ckpt:
        names = args.ckpt.split(",")
        if len(names) != 2:
            raise TsmError(
                f"--ckpt for a Wan 2.2 run names both diffusion models: --ckpt HIGH.safetensors,LOW.safetensors "
                f"(got {args.ckpt!r}; default {files['high']},{files['low']})"
            )
        files["high"], files["low"] = names
    side = (
        args.width or args.resolution or cfg.data.resolution,
        args.height or args.resolution or cfg.data.resolution,
    )
    if side[0] % 16 or side[1] % 16:
        raise TsmError(f"Wan's frame size must be multiples of 16, got {side[0]}x{side[1]}")
    name, out, modules = _pair_name(args), Path(args.comfyui), c.modules()
    loras, scales, paths = {}, {}, []
    for part, label in c.family.part_labels.items():
        model = modules[part]
        if getattr(model, ATTR, None) is None:
            continue
        spec = get_routing(model).spec
        if spec.routing == "smooth" or (get_routing(model).stage == "assemble" and len(spec.scales) > 1):
            raise TsmError(
                "--comfyui switches fostered experts by step; smooth routing and assembled routers are not one "
                "LoRA per interval: export per-step LoRAs with --timesteps"
            )
        n = spec.experts_per_scale[0]
        key = label.removesuffix("_noise")
        loras[key], scales[key] = [], spec.scales[0]
        for i in range(n):
            state = io.lora_state({"transformer": model}, 0, i)
            state[1]["tsm_component"] = part
            file = out / (f"{name}_{label}.safetensors" if n == 1 else f"{name}_s0_i{i}_{label}.safetensors")
            paths.append(comfyui.save_as(state, file, "comfyui", c.family.name))
            loras[key].append(file.name)
    prompt, steps, guidance = _workflow_settings(args, cfg, c)
    graph = comfyui.wan22_workflow(
        loras, scales, c.extra["boundary_timestep"], float(c.scheduler.config.get("flow_shift", 1.0)),
        c.objective.num_timesteps, files, prompt, args.negative_prompt, steps, guidance, side[0], side[1],
        cfg.data.num_frames, args.seed,
    )  # fmt: skip
    comfyui.check_graph(graph)
    workflow = out / "workflow_api.json"
    workflow.write_text(json.dumps(graph, indent=2))
    _, switch = comfyui.wan22_switch(
        float(c.scheduler.config.get("flow_shift", 1.0)), steps, c.extra["boundary_timestep"]
    )
    print(
        f"wrote {len(paths)} LoRA files and {workflow} (high-noise model for steps 0-{switch - 1}, low-noise "
        f"from step {switch} of {steps}): copy the LoRA files into ComfyUI/models/loras/, {files['high']} and "
        f"{files['low']} must be in models/diffusion_models/; queue the workflow (API format) with POST /prompt"
    )


def _export_comfyui(args: argparse.Namespace, cfg: object, c: object) -> None:
    """One ComfyUI LoRA per finest-scale interval of the denoiser, and the API workflow that switches them."""
    from tsm import comfyui
    from tsm.data import resolve_buckets
    from tsm.inject import ATTR

    if args.module not in (None, c.family.denoiser_subfolder):
        raise TsmError("--comfyui exports the denoiser's experts; leave out --module")
    if not args.ckpt:
        raise TsmError(
            "--comfyui needs --ckpt NAME: the base model's file as ComfyUI's models/checkpoints/ lists it "
            "(e.g. --ckpt sd_xl_base_1.0.safetensors)"
        )
    # the latent: --width/--height, else --resolution, else the run's first bucket (a pixel budget: its square
    # bucket, which make_buckets always holds), else data.resolution
    buckets = resolve_buckets(cfg.data.buckets)
    if args.resolution:
        base = (args.resolution, args.resolution)
    elif buckets:
        base = next(b for b in buckets if b[0] == b[1]) if isinstance(cfg.data.buckets, int) else buckets[0]
    else:
        base = (cfg.data.resolution, cfg.data.resolution)
    width, height = args.width or base[0], args.height or base[1]
    if width % 8 or height % 8:
        raise TsmError(
            f"the image size must be multiples of 8 (ComfyUI's latents are 1/8), got {width}x{height}"
        )
    texts = [n for n, m in c.text_encoders.items() if getattr(m, ATTR, None) is not None]
    prompt, steps, guidance = _workflow_settings(args, cfg, c)
    paths = comfyui.export_run(
        c.denoiser,
        c.family.name,
        dict(c.scheduler.config),
        args.comfyui,
        prefix=c.family.denoiser_subfolder,
        width=width,
        height=height,
        ckpt_name=args.ckpt,
        prompt=prompt,
        negative_prompt=args.negative_prompt,
        steps=steps,
        cfg=guidance,
        seed=args.seed,
    )
    print(
        f"wrote {len(paths) - 1} LoRA files and {paths[-1]}: copy the LoRA files into ComfyUI/models/loras/, "
        f"{args.ckpt} must be in ComfyUI/models/checkpoints/; queue the workflow (API format) with POST /prompt"
    )
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


def _configs(args: argparse.Namespace) -> None:
    """No name: one line per packaged config with the command its first line gives; a name: its YAML."""
    from tsm.config import packaged_config, packaged_configs

    if args.name is not None:
        sys.stdout.write(packaged_config(args.name).read_text())
        return
    names = packaged_configs()
    width = max(len(n) for n in names)
    for name in names:
        command = packaged_config(name).read_text().splitlines()[0].removeprefix("#").strip()
        print(f"{name:<{width}}  {command}")


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


def _eval(args: argparse.Namespace) -> None:
    """`tsm eval images DIR --metric M` scores a folder; `tsm eval RUN --suite S --prompts FILE...` samples a run
    on a benchmark's prompts and scores it (tsm/bench/eval.py, docs/eval.md)."""
    from tsm.bench.eval import resolve_device, run_suite, score_folder, summary_line

    if args.batch_size is not None and args.batch_size < 1:
        raise TsmError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.target == "images":
        if args.folder is None:
            raise TsmError("tsm eval images needs the folder: tsm eval images DIR --metric bvqa")
        if args.metric is None:
            raise TsmError("tsm eval images needs --metric: bvqa, clipscore, fid or patch-fid")
        if args.suite is not None or args.prompts:
            raise TsmError(
                "--suite and --prompts sample a run: tsm eval RUN --suite compbench --prompts FILE"
            )
        result = score_folder(
            args.folder,
            args.metric,
            args.model,
            args.reference,
            args.questions,
            args.frames,
            resolve_device(args.device),
            args.batch_size or 32,
        )
        print(summary_line(result))
        return
    if args.folder is not None:
        raise TsmError(
            f"unexpected {args.folder!r}: tsm eval images DIR, or tsm eval RUN --suite compbench ..."
        )
    if args.suite is None or not args.prompts:
        raise TsmError(
            "tsm eval RUN needs --suite (compbench or coco) and --prompts FILE; or: tsm eval images DIR"
        )
    if args.metric is not None or args.model is not None or args.questions is not None:
        raise TsmError(
            "--metric, --model and --questions are for tsm eval images; a suite takes --blip/--clip/--inception"
        )
    results = run_suite(
        args.target,
        args.suite,
        args.prompts,
        args.seeds,
        args.out,
        args.reference,
        args.blip,
        args.clip,
        args.inception,
        args.steps,
        args.guidance,
        args.resolution,
        args.batch_size or 8,
        resolve_device(args.device),
        args.compare,
    )
    print(results["table"])
    for note in results["notes"]:
        print(f"- {note}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsm", description="Timestep LoRA experts for diffusers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="plain LoRA, foster, assemble, distill or glance, from a YAML config (see tsm configs)"
    )
    p.add_argument("config", help="a packaged config's name (tsm configs lists them) or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint of output_dir (overrides may come after it)",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="images from a trained run: PNG files and a grid")
    p.add_argument("run", help="a run directory (or one of its checkpoints/step_N)")
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt (repeat for more; default: validation prompts); a run trained with data.trigger puts "
        'it in front ("trigger, prompt"), unless the prompt starts with it; "" samples unconditionally',
    )
    p.add_argument(
        "--no-trigger", action="store_true", help="use the prompts as given, without the run's data.trigger"
    )
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3], help="one image per prompt and seed")
    p.add_argument(
        "--steps", type=int, default=None, help="sampler steps (default: the family's; digits: validated)"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance (default: the run's train.guidance_scale, else the family's)",
    )
    p.add_argument(
        "--guidance-2",
        type=float,
        default=None,
        help="Wan 2.2: the low-noise transformer's guidance, WanPipeline's guidance_scale_2 (default: --guidance)",
    )
    p.add_argument("--resolution", type=int, default=None, help="square side (default: data.resolution)")
    p.add_argument("--width", type=int, default=None, help="image width (default: --resolution)")
    p.add_argument("--height", type=int, default=None, help="image height (default: --resolution)")
    p.add_argument(
        "--out", default=None, help="output folder (default: a new RUN/samples/sample_NNN per call)"
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.set_defaults(func=_sample)

    p = sub.add_parser(
        "export",
        help="experts as LoRA files (diffusers, kohya, ComfyUI), or a ComfyUI workflow switching them",
    )
    p.add_argument("run", help="a run directory (or one of its checkpoints/step_N)")
    p.add_argument(
        "--module",
        default=None,
        help="export only this part: unet, transformer, text_encoder, ... (default: the denoiser and its text "
        "encoders, in one file)",
    )
    p.add_argument(
        "--scale", type=int, default=None, help="0 = the finest scale (the core experts); default 0"
    )
    p.add_argument("--index", type=int, default=None, help="interval index within the scale; default 0")
    p.add_argument(
        "--name",
        default=None,
        help="Wan 2.2: the files' name before _high_noise / _low_noise (default: the run directory's name)",
    )
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
    p.add_argument(
        "--ckpt",
        default=None,
        help="--comfyui (required): the base checkpoint's file in ComfyUI/models/checkpoints/; Wan 2.2: "
        "HIGH,LOW, the two diffusion models (default: Comfy-Org's repackaged fp16 files)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="--comfyui: the prompt (default: the first validation prompt); the run's data.trigger goes in front",
    )
    p.add_argument("--negative-prompt", default="", help="--comfyui: the negative prompt")
    p.add_argument(
        "--steps", type=int, default=None, help="--comfyui: sampler steps, the keyframes are placed for them"
    )
    p.add_argument("--guidance", type=float, default=None, help="--comfyui: cfg (default: as tsm sample)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="--comfyui: a square side (default: the run's first bucket)",
    )
    p.add_argument("--width", type=int, default=None, help="--comfyui: image width (default: --resolution)")
    p.add_argument("--height", type=int, default=None, help="--comfyui: image height (default: --resolution)")
    p.add_argument("--seed", type=int, default=0, help="--comfyui: the sampler seed")
    p.set_defaults(func=_export)

    p = sub.add_parser("bench", help="built-in benchmarks: digits (quality), digits-fast (few-step), speed")
    p.add_argument("name", choices=["digits", "digits-fast", "speed"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (--help lists them)")
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "eval",
        help="score images (B-VQA, CLIPScore, FID) or sample a run on T2I-CompBench / COCO prompts and score it",
    )
    p.add_argument("target", help="'images' to score a folder, or a run directory to sample and score")
    p.add_argument("folder", nargs="?", default=None, help="tsm eval images DIR: the folder of images")
    p.add_argument(
        "--metric",
        choices=["bvqa", "clipscore", "fid", "patch-fid"],
        default=None,
        help="images: what to compute",
    )
    p.add_argument(
        "--model",
        default=None,
        help="images: the metric's model (a BLIP VQA or CLIP id/folder; FID: Inception weights)",
    )
    p.add_argument(
        "--reference", default=None, help="fid, patch-fid, --suite coco: the folder of real images"
    )
    p.add_argument(
        "--questions", default=None, help="bvqa: JSON prompt -> questions, instead of spaCy's noun chunks"
    )
    p.add_argument(
        "--frames", type=int, default=None, help="clipscore: each image is this many frames side by side"
    )
    p.add_argument(
        "--suite", choices=["compbench", "coco"], default=None, help="RUN: the benchmark to sample and score"
    )
    p.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        help="RUN: prompt files, one prompt a line (compbench: one per category)",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="RUN: one image per prompt and seed"
    )
    p.add_argument(
        "--blip",
        default=None,
        help="RUN: the BLIP VQA model for B-VQA (default Salesforce/blip-vqa-capfilt-large)",
    )
    p.add_argument("--clip", default=None, help="RUN: the CLIP model (default openai/clip-vit-large-patch14)")
    p.add_argument("--inception", default=None, help="RUN, coco: the FID Inception weights file")
    p.add_argument(
        "--compare",
        default=None,
        help='RUN: JSON rows to print beside the run\'s ({"LoRA": {"Colour": 0.4}})',
    )
    p.add_argument("--steps", type=int, default=None, help="RUN: sampler steps (default: the family's)")
    p.add_argument("--guidance", type=float, default=None, help="RUN: guidance (default: as tsm sample)")
    p.add_argument("--resolution", type=int, default=None, help="RUN: square side (default: data.resolution)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default 32 scoring, 8 sampling)"
    )
    p.add_argument("--out", default=None, help="RUN: the output folder (default RUN/eval/<suite>)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("path", help="a .safetensors file or a folder of them")
    p.set_defaults(func=_info)

    p = sub.add_parser("configs", help="list the packaged configs, or print one (tsm configs NAME > my.yaml)")
    p.add_argument("name", nargs="?", default=None, help="a packaged config to print as YAML")
    p.set_defaults(func=_configs)
    return parser


def _quiet_hub_libraries() -> None:
    """Keep stderr for our progress bar and errors: no per-file loading bars from diffusers/transformers."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and not any(a.startswith("-") for a in extra):
        args.overrides += extra  # overrides after --resume: tsm train CONFIG --resume train.steps=8000
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
