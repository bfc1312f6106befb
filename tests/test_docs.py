"""The README and docs/ stay honest: every documented `tsm` command parses with the CLI's own parser, its config
resolves and its overrides are known keys; the README's CPU quickstart and SD1.5 quickstart run (on the digits
model and a tiny SD1.5 folder); every relative link points at a file and a heading that exist."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_models import write_tiny_model

from tsm.bench.digits_data import write_folder
from tsm.cli import build_parser, main
from tsm.config import PACKAGED_CONFIGS, _section_types, load_config, packaged_config, packaged_configs
from tsm.data import write_digits_image_folder

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]


# ---------------------------------------------------------------------------------------------------------
# the documented commands
# ---------------------------------------------------------------------------------------------------------
def fenced_lines(text: str) -> list[str]:
    """Every line inside a ``` fence."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line.strip())
    return lines


def tsm_argv(line: str) -> list[list[str]]:
    """The `tsm ...` commands of one shell line (after `$ `, `&&`, or as `-m tsm.cli ...`), as argv lists."""
    out = []
    for part in line.removeprefix("$ ").split("&&"):
        words = shlex.split(part, comments=True)
        if words[:1] == ["tsm"]:
            out.append(words[1:])
        elif "tsm.cli" in words and words[words.index("tsm.cli") - 1] == "-m":
            out.append(words[words.index("tsm.cli") + 1 :])
    return out


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command of the README, docs/*.md and each packaged config's first line."""
    found = []
    for page in PAGES:
        for line in fenced_lines(page.read_text()):
            found += [(f"{page.name}: {line}", argv) for argv in tsm_argv(line)]
    for path in sorted(PACKAGED_CONFIGS.rglob("*.yaml")):
        first = path.read_text().splitlines()[0].removeprefix("#").split("  (")[0]  # "(data first: ...)"
        found += [(f"{path.name}: {first}", argv) for argv in tsm_argv(first)]
    return found


COMMANDS = documented_commands()


def test_the_docs_document_every_command():
    names = {argv[0] for _, argv in COMMANDS}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert names == set(sub.choices), names  # every subcommand of the CLI, and no other
    # every packaged training config is started somewhere in the docs, and from its own first line
    trained = {argv[1] for _, argv in COMMANDS if argv[0] == "train"}
    assert {n for n in packaged_configs() if "/" not in n} <= trained


def split_redirect(argv: list[str]) -> tuple[list[str], str | None]:
    """`tsm configs NAME > FILE`: the argv without the redirect, and FILE."""
    if ">" in argv:
        i = argv.index(">")
        return argv[:i] + argv[i + 2 :], argv[i + 1]
    return argv, None


def bench_help(name: str, capsys) -> str:
    """The --help text of `tsm bench NAME` (the benchmarks parse their own options)."""
    from tsm.bench import digits, digits_fast, speed

    run = {"digits": digits.main, "digits-fast": digits_fast.main, "speed": speed.main}[name]
    with pytest.raises(SystemExit):
        run(["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w[:90] for w, _ in COMMANDS])
def test_a_documented_command_parses_and_its_config_and_keys_exist(where, argv, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # a repository path (tsm/configs/...) resolves as in a checkout
    aliases = {}  # `tsm configs NAME > FILE`, then `tsm train FILE`: FILE holds NAME's YAML
    for _, other in COMMANDS:
        words, file = split_redirect(other)
        if words[0] == "configs" and file:
            aliases[file] = words[1]
    argv, _ = split_redirect(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"does not parse: {capsys.readouterr().err.strip()}")
    if args.command == "train":
        assert all("=" in o and "." in o.split("=")[0] for o in args.overrides), args.overrides
        load_config(aliases.get(args.config, args.config), args.overrides)  # raises on an unknown key
    elif args.command == "configs" and args.name is not None:
        assert packaged_config(args.name).is_file()
    elif args.command == "bench":
        text = bench_help(args.name, capsys)
        if "--few-step" in args.rest:  # the few-step rows take digits-fast's options
            text += bench_help("digits-fast", capsys)
        for flag in [a for a in args.rest if a.startswith("--")]:
            assert flag in text, f"tsm bench {args.name} has no {flag}"


def test_every_config_key_is_documented_in_training_md():
    text = (REPO / "docs" / "training.md").read_text()
    keys = [f"{s}.{f.name}" for s, cls in _section_types().items() for f in dataclasses.fields(cls)]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/training.md does not describe {missing}"


def test_every_packaged_config_starts_with_its_command_and_loads():
    names = packaged_configs()
    assert "sd15_foster" in names and "accelerate/fsdp" in names
    for name in names:
        first = packaged_config(name).read_text().splitlines()[0]
        if name.startswith("accelerate/"):
            assert first.startswith(
                f"# accelerate launch --config_file {Path(name).name}.yaml -m tsm.cli train "
            )
        else:
            assert first.startswith(f"# tsm train {name} "), first
            assert load_config(name) == load_config(packaged_config(name))  # by name == by path


# ---------------------------------------------------------------------------------------------------------
# a few documented commands, run
# ---------------------------------------------------------------------------------------------------------
def readme_commands(word: str) -> list[list[str]]:
    """The README's commands whose line mentions ``word``, in order."""
    return [argv for line in fenced_lines(README.read_text()) if word in line for argv in tsm_argv(line)]


def test_tsm_configs_lists_and_prints_the_packaged_configs(capsys, tmp_path, monkeypatch):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == packaged_configs()
    assert any(line.split()[1:4] == ["tsm", "train", "sd15_foster"] for line in lines)
    # tsm configs NAME > my.yaml, then tsm train my.yaml: the same config as the packaged name
    assert main(["configs", "sd15_foster"]) == 0
    monkeypatch.chdir(tmp_path)
    Path("my.yaml").write_text(capsys.readouterr().out)
    assert load_config("my.yaml") == load_config("sd15_foster")
    # an unknown name is one line that lists the packaged names; a missing .yaml path is not looked up
    assert main(["configs", "sd15_fostr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sd15_fostr" in err and "sd15_foster" in err and "wan_foster" in err
    assert main(["train", "sd15_fostr.yaml"]) == 2
    assert "config file sd15_fostr.yaml does not exist" in capsys.readouterr().err
    # a file of a packaged config's name in the working folder wins over the packaged one
    Path("sd15_foster").write_text("train:\n  steps: 7\n")
    assert load_config("sd15_foster").train.steps == 7


def test_the_readme_cpu_quickstart_runs(tmp_path, capsys, monkeypatch):
    """`python -m tsm.bench.digits_data ... && tsm train digits_distill`, `tsm sample`, `tsm info` as written,
    on fewer images and steps."""
    monkeypatch.chdir(tmp_path)
    train, sample, info = readme_commands("digits_distill")
    assert train[:2] == ["train", "digits_distill"] and sample[0] == "sample" and info[0] == "info"
    write_folder(
        "data/digits_source", n=8
    )  # what `python -m tsm.bench.digits_data data/digits_source` writes
    tiny = ["train.steps=2", "train.assemble_steps=1", "train.batch_size=2", "distill.fake_updates=1"]
    assert main([*train, *tiny]) == 0, capsys.readouterr().err
    assert (tmp_path / "runs" / "digits_distill" / "unet.safetensors").is_file()
    capsys.readouterr()
    before = set((tmp_path / "runs").rglob("*.png"))
    assert main(sample) == 0, capsys.readouterr().err
    seeds = sample[sample.index("--seeds") + 1 :]
    assert len(set((tmp_path / "runs").rglob("*.png")) - before) >= len(seeds)  # one per seed, and a grid
    assert main(info) == 0
    out = capsys.readouterr().out
    assert "stage: assemble" in out and "scales: [4, 1]" in out


def test_the_readme_sd15_quickstart_runs(tmp_path, capsys, monkeypatch):
    """`tsm train sd15_foster model.path=... data.path=...` and its `tsm export` lines as written, on a tiny
    SD1.5 folder and a few 16-pixel images."""
    model = write_tiny_model("sd15", tmp_path / "sd15")
    images = write_digits_image_folder(tmp_path / "images", n=4, size=16)
    monkeypatch.chdir(tmp_path)
    train = next(a for a in readme_commands("sd15_foster") if a[:2] == ["train", "sd15_foster"])
    paths = {"model.path": model, "data.path": images}
    argv = [f"{o.split('=')[0]}={paths[o.split('=')[0]]}" if o.split("=")[0] in paths else o for o in train]
    tiny = ["data.resolution=16", "experts.rank=2", "train.steps=2", "train.batch_size=2"]
    tiny += ["train.validation_prompts=[]", "train.log_with=none"]
    assert main([*argv, *tiny]) == 0, capsys.readouterr().err
    exports = [a for a in readme_commands("runs/sd15_foster") if a[0] == "export"]
    assert {"--all", "kohya"} <= {w for a in exports for w in a}
    for export in exports:
        assert main(export) == 0, capsys.readouterr().err
    files = sorted((tmp_path / "experts").glob("*.safetensors"))
    assert len(files) == 4  # the default form: 4 interval experts, each file with the shared part stacked in
    assert all(v.shape[0] == 8 + 2 for k, v in load_file(files[0]).items() if k.endswith(".lora_A.weight"))
    assert any(k.startswith("lora_unet_") for k in _keys(tmp_path / "expert3.safetensors"))


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# ---------------------------------------------------------------------------------------------------------
# links and length
# ---------------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_points_at_an_existing_file_and_heading(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code are not links
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        file, _, anchor = link.partition("#")
        target = (page.parent / file).resolve() if file else page
        assert target.is_file(), f"{page.name}: {link} points at no file"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name}: {link} points at no heading"


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"
    first = [line.split("#")[0].strip() for line in fenced_lines(README.read_text())[:2]]
    assert first == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    # every docs page is linked from the README
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in README.read_text(), page.name
