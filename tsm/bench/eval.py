"""`tsm eval`: score a folder of images (B-VQA, CLIPScore, FID, Patch-FID), or sample a trained run on a
benchmark's prompts and score it (T2I-CompBench, COCO) with a table beside the base model's published rows
(T2I-CompBench) and any ``--compare`` rows.

    tsm eval images DIR --metric bvqa|clipscore|fid|patch-fid [--model ID] [--reference DIR] [--questions FILE]
    tsm eval RUN --suite compbench --prompts color_val.txt shape_val.txt texture_val.txt non_spatial_val.txt
    tsm eval RUN --suite coco --prompts coco_prompts.txt --reference coco_val2014/ --inception pt_inception.pth

A suite writes ``RUN/eval/<suite>/<category>/seed<k>/NNNNN.png`` with a ``.txt`` sidecar per image (the
prompt as written in the prompt file, without the run's trigger), so each folder is also a valid
``tsm eval images`` folder; images already there are not sampled again, and scores come from the per-image
cache, so an interrupted evaluation resumes. Then ``results.json`` and ``results.md`` beside them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsm.errors import TsmError, shorten
from tsm.metrics import folder

METRICS = ("bvqa", "clipscore", "fid", "patch-fid")
SUITES = ("compbench", "coco")
# T2I-CompBench's prompt files are <category>_val.txt / _train.txt: the category is the file name's start
COMPBENCH = {  # category -> (column, metric)
    "color": ("Colour", "bvqa"),
    "shape": ("Shape", "bvqa"),
    "texture": ("Texture", "bvqa"),
    "non_spatial": ("Non-spatial", "clipscore"),
}
NOT_IMPLEMENTED = {
    "spatial": "Spatial needs UniDet's detections, which tsm does not ship",
    "complex": "Complex is T2I-CompBench's 3-in-1 (mean of B-VQA, UniDet spatial and CLIP), which needs UniDet",
    "numeracy": "numeracy is T2I-CompBench++'s (UniDet counts)",
    "3d_spatial": "3D spatial is T2I-CompBench++'s (UniDet with depth)",
}
# T2I-CompBench's non-spatial column (their CLIPScore_eval): OpenAI CLIP ViT-B/32, the mean cosine (not x100)
COMPBENCH_CLIP = "openai/clip-vit-base-patch32"
# The paper's own rows (TSM, arXiv 2503.07416, Table 4) by family: not recorded here, since the table could not
# be read where this was written (docs/eval.md). Give them with --compare FILE instead of trusting a number
# typed from memory.
PAPER_ROWS: dict[str, dict[str, dict[str, float]]] = {}
# The base models' own published T2I-CompBench scores (their protocol: B-VQA, CLIP ViT-B/32 mean cosine), by
# family, printed beside the run's compbench row: the untrained base a run starts from, not the TSM paper's
# rows. Each label names its source; the numbers are the sources' as printed (Complex and Spatial left out,
# since tsm does not score them). No published row for SD3 was found; see docs/eval.md.
PUBLISHED_ROWS: dict[str, dict[str, dict[str, float]]] = {
    "sd15": {
        "SD v1.5 base (ELLA, arXiv 2403.05135, Table 3)": {
            "Colour": 0.3750,
            "Shape": 0.3724,
            "Texture": 0.4159,
            "Non-spatial": 0.3088,
        },
    },
    "sdxl": {
        "SDXL base (PixArt-α, arXiv 2310.00426, Table 3; from T2I-CompBench)": {
            "Colour": 0.6369,
            "Shape": 0.5408,
            "Texture": 0.5637,
            "Non-spatial": 0.3110,
        },
    },
    "pixart": {
        "PixArt-α base (PixArt-α, arXiv 2310.00426, Table 3)": {
            "Colour": 0.6886,
            "Shape": 0.5582,
            "Texture": 0.7044,
            "Non-spatial": 0.3179,
        },
    },
}


# ---------------------------------------------------------------------------------------------------------
# one folder
# ---------------------------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise TsmError(f"--device {shorten(name or '')!r} is not a device; use cuda, cuda:1 or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TsmError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return device


def score_folder(
    directory: str | Path,
    metric: str,
    model: str | None = None,
    reference: str | Path | None = None,
    questions: str | Path | None = None,
    frames: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    loaded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the images of ``directory`` with ``metric``; writes ``directory/eval_<metric>.json`` and returns
    its content. ``loaded``: models already loaded, by (metric, id), reused across folders."""
    from tsm.metrics import bvqa, clipscore, fid

    if metric not in METRICS:
        raise TsmError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric in ("fid", "patch-fid"):
        if reference is None:
            raise TsmError(f"--metric {metric} needs --reference DIR: the real images to compare with")
        if model is None:
            raise TsmError(
                f"--metric {metric} needs --model FILE: the FID Inception weights, pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth (docs/eval.md)"
            )
    if questions is not None and metric != "bvqa":
        raise TsmError("--questions is for --metric bvqa")
    if frames is not None and metric != "clipscore":
        raise TsmError("--frames is for --metric clipscore (clips as tsm sample writes them)")
    items = folder.scan(directory, need_prompts=metric in ("bvqa", "clipscore"))
    loaded = {} if loaded is None else loaded

    def get(kind: str, make: Any, key: str) -> Any:
        if (kind, key) not in loaded:
            loaded[(kind, key)] = make()
        return loaded[(kind, key)]

    if metric == "bvqa":
        model = model or bvqa.DEFAULT_MODEL
        asked = bvqa.read_questions(questions) if questions is not None else None
        scorer = get("bvqa", lambda: bvqa.BlipVQA(model, device), model)
        result = bvqa.bvqa(items, scorer, asked, batch_size=batch_size, progress=progress)
    elif metric == "clipscore":
        model = model or clipscore.DEFAULT_MODEL
        scorer = get("clip", lambda: clipscore.Clip(model, device), model)
        result = clipscore.clip_score(items, scorer, frames, batch_size=batch_size, progress=progress)
    else:
        ref = folder.scan(reference, need_prompts=False)
        scorer = get("inception", lambda: fid.InceptionFeatures(model, device), model)
        result = fid.fid(
            items, ref, scorer, patch=metric == "patch-fid", batch_size=batch_size, progress=progress
        )
        result["reference"] = str(reference)
    result["folder"] = str(directory)
    result["file"] = str(folder.write_result(directory, metric, result))
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One line: the score, what it was computed on, where the JSON is."""
    name = {"bvqa": "B-VQA", "clipscore": "CLIPScore", "fid": "FID", "patch-fid": "Patch-FID"}[
        result["metric"]
    ]
    line = f"{name} {result['score']:.4f} on {result['images']} images"
    if "reference_images" in result:
        line += f" against {result['reference_images']} reference images"
    if result.get("without_questions"):
        line += f" ({result['without_questions']} without a noun chunk, scored 1)"
    if "clip_temp" in result:
        line += f"; CLIP-Temp {result['clip_temp']:.4f}"
    return f"{line}; model {result['model']}; wrote {result['file']}"


# ---------------------------------------------------------------------------------------------------------
# a run on a benchmark
# ---------------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line (T2I-CompBench's and COCO caption files), blank lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TsmError(
            f"cannot read the prompt file {path} ({type(e).__name__}); one prompt a line, UTF-8"
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise TsmError(f"the prompt file {path} holds no prompt; one prompt a line")
    return prompts


def compbench_category(path: str | Path) -> str:
    """``color_val.txt`` -> ``color``; a category tsm does not score is one line naming why."""
    stem = Path(path).stem.lower().replace("-", "_")
    for name in sorted([*COMPBENCH, *NOT_IMPLEMENTED], key=len, reverse=True):
        if stem == name or stem.startswith(name + "_"):
            if name in NOT_IMPLEMENTED:
                raise TsmError(f"{Path(path).name}: not implemented — {NOT_IMPLEMENTED[name]}")
            return name
    raise TsmError(
        f"{Path(path).name}: name T2I-CompBench prompt files by category ({', '.join(COMPBENCH)}), e.g. color_val.txt"
    )


def _sample_missing(
    run: str | Path, jobs: list[tuple[Path, str, int]], state: dict[str, Any], options: dict[str, Any]
) -> None:
    """Sample every (file, prompt, seed) whose file is not there yet, in batches; the run loads on first need."""
    from tsm.images import to_pil
    from tsm.recipes.run import guidance_of, load_run, sample_run
    from tsm.sampling import with_trigger

    todo = [(path, prompt, seed) for path, prompt, seed in jobs if not path.is_file()]
    if not todo:
        return
    if "run" not in state:
        state["run"] = load_run(run, options["device"])
    cfg, c = state["run"]
    steps = c.family.default_steps if options["steps"] is None else options["steps"]
    guidance = guidance_of(cfg, c) if options["guidance"] is None else options["guidance"]
    size = options["resolution"] or cfg.data.resolution
    batch = options["batch_size"]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        prompts = [p for _, p, _ in chunk]
        if cfg.data.trigger:  # as tsm sample: the trigger in front, the sidecar keeps the prompt as written
            prompts = with_trigger(prompts, cfg.data.trigger)
        images = sample_run(
            cfg,
            c,
            prompts,
            [s for _, _, s in chunk],
            steps,
            guidance,
            size,
            desc=f"sampling {start + len(chunk)}/{len(todo)}",
        )
        for (path, prompt, _), image in zip(chunk, images, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".txt").write_text(prompt, encoding="utf-8")
            tmp = path.with_name(f".{path.name}.tmp")
            to_pil(image).save(tmp, format="PNG")
            tmp.replace(path)  # a file that exists is a whole image: resume trusts it


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "per_seed": [float(v) for v in values],
    }


def _cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "—"
    return (
        f"{stats['mean']:.4f} ± {stats['std']:.4f}" if len(stats["per_seed"]) > 1 else f"{stats['mean']:.4f}"
    )


def read_compare(path: str | Path | None) -> dict[str, dict[str, float]]:
    """``--compare FILE``: rows to print beside the run's, {"row name": {"Colour": 0.37, ...}} (columns as printed)."""
    if path is None:
        return {}
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TsmError(f"cannot read --compare {path} as JSON ({type(e).__name__})") from None
    if not (isinstance(rows, dict) and all(isinstance(r, dict) for r in rows.values())):
        raise TsmError(
            f'--compare {path} must be a JSON object of row -> {{column: value}}: {{"LoRA": {{"Colour": 0.4}}}}'
        )
    return rows


def table(
    columns: list[str], ours: dict[str, dict[str, Any]], label: str, others: dict[str, dict[str, float]]
) -> str:
    """A markdown table: the run's row (mean ± std over seeds), then the rows to compare with."""
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines.append(f"| {label} | " + " | ".join(_cell(ours.get(c)) for c in columns) + " |")
    for name, row in others.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), int | float) else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_suite(
    run: str | Path,
    suite: str,
    prompt_files: Sequence[str | Path],
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path | None = None,
    reference: str | Path | None = None,
    blip: str | None = None,
    clip: str | None = None,
    inception: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    resolution: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    compare: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample ``run`` on each prompt file once per seed, score each (category, seed) folder, and write
    ``results.json`` and ``results.md`` (the table) to the output folder. Returns the results."""
    if suite not in SUITES:
        raise TsmError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise TsmError("--seeds must be distinct whole numbers >= 0, e.g. --seeds 0 1 2")
    if steps is not None and steps < 1:
        raise TsmError(f"--steps must be at least 1, got {steps}")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise TsmError(f"--guidance must be a finite number >= 0, got {guidance}")
    run = Path(run)
    if not (run / "config.yaml").is_file() and not (run.parent.parent / "config.yaml").is_file():
        raise TsmError(f"{run} is not a tsm run directory (no config.yaml); pass the run's output_dir")
    if suite == "coco":
        if len(prompt_files) != 1:
            raise TsmError("--suite coco takes one --prompts file (one caption a line)")
        if reference is None or inception is None:
            raise TsmError(
                "--suite coco needs --reference DIR (the real images) and --inception FILE (docs/eval.md)"
            )
        plan = [("coco", prompt_files[0], ["fid", "clipscore"])]
    else:
        plan = [(cat, f, [COMPBENCH[cat][1]]) for f in prompt_files for cat in [compbench_category(f)]]
        if len({cat for cat, _, _ in plan}) != len(plan):
            raise TsmError("two --prompts files of the same category; give one file per category")
    prompts = {cat: read_prompts(f) for cat, f, _ in plan}
    out = Path(out) if out is not None else run / "eval" / suite
    options = {
        "device": device,
        "steps": steps,
        "guidance": guidance,
        "resolution": resolution,
        "batch_size": batch_size,
    }
    models = {
        "bvqa": blip,
        "clipscore": clip or (COMPBENCH_CLIP if suite == "compbench" else None),
        "fid": inception,
    }
    state: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    for cat, _, metrics in plan:
        for seed in seeds:
            where = out / cat / f"seed{seed}"
            jobs = [(where / f"{i:05d}.png", p, seed) for i, p in enumerate(prompts[cat])]
            _sample_missing(run, jobs, state, options)
            for metric in metrics:
                result = score_folder(
                    where,
                    metric,
                    models[metric],
                    reference if metric == "fid" else None,
                    device=device,
                    progress=progress,
                    loaded=loaded,
                )
                column = (
                    COMPBENCH[cat][0]
                    if suite == "compbench"
                    else {"fid": "FID", "clipscore": "CLIPScore"}[metric]
                )
                value = result["score"]
                if suite == "compbench" and metric == "clipscore":  # their scale: the mean cosine, unclamped
                    value = float(np.mean([r["score"] for r in result["per_image"]])) / 100
                scores.setdefault(column, []).append(value)
    columns = (
        [COMPBENCH[c][0] for c in COMPBENCH if c in prompts] if suite == "compbench" else ["FID", "CLIPScore"]
    )
    ours = {column: _mean_std(values) for column, values in scores.items()}
    family = state["run"][0].model.family if "run" in state else None
    if family is None:
        from tsm.config import load_config

        family = load_config(
            (run if (run / "config.yaml").is_file() else run.parent.parent) / "config.yaml"
        ).model.family
    published = PUBLISHED_ROWS.get(family, {}) if suite == "compbench" else {}
    others = {f"published: {name}": dict(row) for name, row in published.items()}
    others.update({f"paper: {name}": row for name, row in PAPER_ROWS.get(family, {}).items()})
    others.update(read_compare(compare))
    label = f"{run.name} (seeds {' '.join(map(str, seeds))})"
    text = table(columns, ours, label, others)
    notes = [f"{n}: not implemented — {why}" for n, why in NOT_IMPLEMENTED.items() if suite == "compbench"]
    if not PAPER_ROWS.get(family):
        if published:
            extra = f"the 'published:' row is the {family} base model's own score, printed for reference"
        elif suite == "compbench":
            extra = f"no published base-model row for {family} was found either"
        else:
            extra = ""
        notes.append(
            f"the TSM paper's rows for {family} are not recorded in tsm"
            + (f"; {extra}" if extra else "")
            + ": see docs/eval.md; --compare FILE adds rows"
        )
    results = {
        "suite": suite,
        "run": str(run),
        "family": family,
        "seeds": list(seeds),
        "columns": ours,
        "compare": others,
        "notes": notes,
        "table": text,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.md").write_text(
        text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n", encoding="utf-8"
    )
    return results
