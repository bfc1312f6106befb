"""`tsm eval` through `tsm.cli.main` on tiny models: the summary line and eval_<metric>.json of each metric, the
one-line errors, resume after an interruption, and the compbench suite's folders and table."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_metrics import write_images, write_tiny_blip, write_tiny_clip

from tsm.cli import main
from tsm.metrics import bvqa, inception


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TSM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    torch.save(inception.FIDInceptionV3().state_dict(), root / "pt_inception-2015-12-05-6726825d.pth")
    return {
        "blip": str(write_tiny_blip(root / "blip")),
        "clip": str(write_tiny_clip(root / "clip")),
        "inception": str(root / "pt_inception-2015-12-05-6726825d.pth"),
    }


def _questions(tmp_path, mapping):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(mapping))
    return str(path)


def test_eval_images_bvqa_and_clipscore_write_their_json(tiny, tmp_path, capsys):
    images = write_images(tmp_path / "imgs", ["a red car", "a blue bench", "a red car"])
    q = _questions(tmp_path, {"a red car": ["a red car?"], "a blue bench": ["a blue bench?", "a bench?"]})
    assert (
        main(["eval", "images", str(images), "--metric", "bvqa", "--model", tiny["blip"], "--questions", q])
        == 0
    )
    line = capsys.readouterr().out.strip()
    result = json.loads((images / "eval_bvqa.json").read_text())
    assert line.startswith(f"B-VQA {result['score']:.4f} on 3 images") and line.endswith("eval_bvqa.json")
    assert result["score"] == pytest.approx(sum(r["score"] for r in result["per_image"]) / 3)
    assert [len(r["answers"]) for r in result["per_image"]] == [1, 2, 1]
    assert (
        result["model"] == tiny["blip"]
        and result["revision"].startswith("local:")
        and result["image_size"] == 480
    )

    assert main(["eval", "images", str(images), "--metric", "clipscore", "--model", tiny["clip"]]) == 0
    result = json.loads((images / "eval_clipscore.json").read_text())
    assert capsys.readouterr().out.startswith(f"CLIPScore {result['score']:.4f} on 3 images")
    assert len(result["per_image"]) == 3 and result["model"] == tiny["clip"]


def test_eval_images_fid_through_main(tiny, tmp_path, capsys, monkeypatch):
    """tsm eval images DIR --metric fid --reference REF, with the real-size Inception at random init. Only the
    first 16 of its 2048 features go on to the Frechet distance: scipy's sqrtm of a 2048x2048 matrix takes ~20 s
    on 2 cores (the distance itself is checked against scipy in test_eval_metrics.py)."""
    from tsm.metrics import fid

    full = fid.InceptionFeatures.features
    monkeypatch.setattr(fid.InceptionFeatures, "features", lambda self, images: full(self, images)[:, :16])
    images = write_images(tmp_path / "gen", [None, None], seed=1)
    reference = write_images(tmp_path / "ref", [None, None], seed=2)
    argv = ["eval", "images", str(images), "--metric", "fid", "--reference", str(reference)]
    assert main([*argv, "--model", tiny["inception"]]) == 0
    result = json.loads((images / "eval_fid.json").read_text())
    assert capsys.readouterr().out.startswith(
        f"FID {result['score']:.4f} on 2 images against 2 reference images"
    )
    assert result["score"] > 0 and result["reference"] == str(reference)
    # the same folders again: the features come from the cache, the number is the same
    assert main([*argv, "--model", tiny["inception"]]) == 0
    assert json.loads((images / "eval_fid.json").read_text())["score"] == result["score"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no prompt", "1 of 2 images in"),
        ("one image", "FID needs at least 2 images"),
        ("not blip", "is not a BLIP VQA model"),
        ("no chunks", "no prompt has a noun chunk"),
        ("no reference", "needs --reference DIR"),
    ],
)
def test_bad_input_is_one_line(tiny, tmp_path, capsys, case, message):
    two = write_images(tmp_path / "two", ["a red car", None])
    one = write_images(tmp_path / "one", ["a red car"])
    argv = {
        "no prompt": ["images", str(two), "--metric", "clipscore", "--model", tiny["clip"]],
        "one image": [
            "images",
            str(one),
            "--metric",
            "fid",
            "--model",
            tiny["inception"],
            "--reference",
            str(two),
        ],
        "not blip": ["images", str(one), "--metric", "bvqa", "--model", tiny["clip"]],
        "no chunks": [
            "images",
            str(one),
            "--metric",
            "bvqa",
            "--model",
            tiny["blip"],
            "--questions",
            _questions(tmp_path, {"a red car": []}),
        ],
        "no reference": ["images", str(one), "--metric", "fid", "--model", tiny["inception"]],
    }[case]
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tsm eval: error: ") and err.count("\n") == 1 and message in err, err


def test_an_interrupted_evaluation_resumes(tiny, tmp_path, capsys, monkeypatch):
    """Stopped (Ctrl-C) in the third batch: the first two images' answers are cached, the rerun asks only the
    rest, and the score equals an uninterrupted run's."""
    prompts = ["a red car", "a blue bench", "a green ball", "a red car"]
    images = write_images(tmp_path / "imgs", prompts)
    q = _questions(tmp_path, {p: [f"{p}?"] for p in prompts})
    argv = ["eval", "images", str(images), "--metric", "bvqa", "--model", tiny["blip"], "--questions", q]
    asked = []
    real = bvqa.BlipVQA.answer

    def answer(self, pixels, index, questions):
        if len(asked) == 2 and not getattr(answer, "resumed", False):
            raise KeyboardInterrupt
        asked.extend(questions)
        return real(self, pixels, index, questions)

    monkeypatch.setattr(bvqa.BlipVQA, "answer", answer)
    assert main([*argv, "--batch-size", "1"]) == 130
    assert asked == ["a red car?", "a blue bench?"] and not (images / "eval_bvqa.json").exists()
    answer.resumed = True
    asked.clear()
    assert main([*argv, "--batch-size", "1"]) == 0
    assert asked == ["a green ball?", "a red car?"]  # the last two images only
    resumed = json.loads((images / "eval_bvqa.json").read_text())["score"]
    monkeypatch.setenv("TSM_CACHE", str(tmp_path / "fresh"))
    asked.clear()
    assert main([*argv, "--batch-size", "2"]) == 0
    assert len(asked) == 4 and json.loads((images / "eval_bvqa.json").read_text())["score"] == resumed
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------
# tsm eval RUN --suite compbench
# ---------------------------------------------------------------------------------------------------------
class _Family:
    default_steps, default_guidance = 2, 1.0


class _Components:
    family = _Family()


def _fake_run(tmp_path, monkeypatch, family="sd15"):
    """A run directory of ``family`` whose sampling is stubbed (load_run / sample_run), so the suite's own logic
    is tested here; each sampled image is noise drawn from its seed."""
    import tsm.recipes.run as run_module
    from tsm.config import Config

    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  family: {family}\n")
    sampled = []

    def sample_run(cfg, c, prompts, seeds, steps, guidance, resolution, progress=True, desc=""):
        sampled.extend(zip(prompts, seeds, strict=True))
        return torch.stack(
            [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds]
        )

    cfg = Config()
    cfg.model.family = family
    cfg.data.resolution = 32
    monkeypatch.setattr(run_module, "load_run", lambda path, device="cpu": (cfg, _Components()))
    monkeypatch.setattr(run_module, "sample_run", sample_run)
    return run, sampled


def test_compbench_suite_samples_scores_and_tabulates(tiny, tmp_path, capsys, monkeypatch):
    run, sampled = _fake_run(tmp_path, monkeypatch)
    color = tmp_path / "color_val.txt"
    color.write_text("a red car\na blue bench\n")
    non_spatial = tmp_path / "non_spatial_val.txt"
    non_spatial.write_text("a man riding a car\n")
    monkeypatch.setattr(bvqa, "spacy_chunker", lambda: lambda prompt: [" ".join(prompt.split()[:3])])
    compare = tmp_path / "paper.json"
    compare.write_text(json.dumps({"LoRA (typed from the paper)": {"Colour": 0.5}}))
    argv = [
        "eval",
        str(run),
        "--suite",
        "compbench",
        "--prompts",
        str(color),
        str(non_spatial),
        "--seeds",
        "0",
        "1",
    ]
    argv += ["--blip", tiny["blip"], "--clip", tiny["clip"], "--compare", str(compare), "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert sorted(sampled) == sorted(
        [(p, s) for p in ("a red car", "a blue bench", "a man riding a car") for s in (0, 1)]
    )
    where = run / "eval" / "compbench"
    assert (where / "color" / "seed1" / "00001.txt").read_text() == "a blue bench"
    results = json.loads((where / "results.json").read_text())
    per_seed = [
        json.loads((where / "color" / f"seed{s}" / "eval_bvqa.json").read_text())["score"] for s in (0, 1)
    ]
    assert results["columns"]["Colour"]["per_seed"] == per_seed
    assert list(results["columns"]) == ["Colour", "Non-spatial"]
    for s in (0, 1):  # Non-spatial on T2I-CompBench's scale: the mean cosine, each image's CLIPScore / 100
        rows = json.loads((where / "non_spatial" / f"seed{s}" / "eval_clipscore.json").read_text())[
            "per_image"
        ]
        assert results["columns"]["Non-spatial"]["per_seed"][s] == pytest.approx(rows[0]["score"] / 100)
    assert "| row | Colour | Non-spatial |" in out and "| LoRA (typed from the paper) | 0.5000 | — |" in out
    assert "Spatial needs UniDet" in out and (where / "results.md").read_text().startswith("| row |")
    # run again: nothing is sampled, the table is the same
    sampled.clear()
    assert main(argv) == 0 and sampled == []
    assert json.loads((where / "results.json").read_text())["columns"] == results["columns"]


PUBLISHED = {  # family -> (label as printed, Colour, Shape, Texture, Non-spatial), as the sources print them
    "sd15": (
        "published: SD v1.5 base (ELLA, arXiv 2403.05135, Table 3)",
        "0.3750",
        "0.3724",
        "0.4159",
        "0.3088",
    ),
    "sdxl": (
        "published: SDXL base (PixArt-α, arXiv 2310.00426, Table 3; from T2I-CompBench)",
        "0.6369",
        "0.5408",
        "0.5637",
        "0.3110",
    ),
    "pixart": (
        "published: PixArt-α base (PixArt-α, arXiv 2310.00426, Table 3)",
        "0.6886",
        "0.5582",
        "0.7044",
        "0.3179",
    ),
}


def test_published_rows_are_the_sources_numbers():
    from tsm.bench.eval import PAPER_ROWS, PUBLISHED_ROWS

    columns = ["Colour", "Shape", "Texture", "Non-spatial"]
    assert {
        family: tuple([f"published: {label}"] + [f"{row[c]:.4f}" for c in columns])
        for family, rows in PUBLISHED_ROWS.items()
        for label, row in rows.items()
    } == PUBLISHED
    assert PAPER_ROWS == {}  # the TSM paper's own rows stay for --compare


@pytest.mark.parametrize("family", ["sd15", "pixart", "sd3"])
def test_compbench_table_prints_the_family_s_published_row(tiny, tmp_path, capsys, monkeypatch, family):
    """The run's family picks the published base row (sd15 ELLA's, pixart PixArt-α's); sd3 has none."""
    run, _ = _fake_run(tmp_path, monkeypatch, family)
    files = []
    for category in ("color", "shape", "texture", "non_spatial"):
        files.append(tmp_path / f"{category}_val.txt")
        files[-1].write_text("a red car\n")
    monkeypatch.setattr(bvqa, "spacy_chunker", lambda: lambda prompt: [prompt])
    argv = ["eval", str(run), "--suite", "compbench", "--prompts", *map(str, files), "--seeds", "0"]
    assert main([*argv, "--blip", tiny["blip"], "--clip", tiny["clip"], "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == "| row | Colour | Shape | Texture | Non-spatial |" and rows[1].startswith(
        "| tiny (seeds 0) |"
    )
    results = json.loads((run / "eval" / "compbench" / "results.json").read_text())
    if family in PUBLISHED:
        label, *values = PUBLISHED[family]
        assert rows[2:] == [f"| {label} | " + " | ".join(values) + " |"]
        assert results["compare"] == {
            label: dict(zip(["Colour", "Shape", "Texture", "Non-spatial"], map(float, values), strict=True))
        }
        assert f"the 'published:' row is the {family} base model's own score" in out
    else:
        assert rows[2:] == [] and results["compare"] == {}
        assert "no published base-model row for sd3 was found" in out
    assert f"the TSM paper's rows for {family} are not recorded in tsm" in out


def test_suite_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    run, _ = _fake_run(tmp_path, monkeypatch)
    spatial = tmp_path / "spatial_val.txt"
    spatial.write_text("a car on the left of a dog\n")
    assert main(["eval", str(run), "--suite", "compbench", "--prompts", str(spatial)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not implemented" in err and "UniDet" in err
    assert main(["eval", str(run), "--prompts", str(spatial)]) == 2
    assert "needs --suite" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--suite", "coco", "--prompts", str(spatial)]) == 2
    assert "not a tsm run directory" in capsys.readouterr().err
