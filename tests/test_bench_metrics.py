"""The digits benchmark's data and metrics: the metrics must tell real digits from noise and from the wrong
digit, read colours exactly, and the data splits must be fixed and held out as documented."""

import random

import numpy as np
import pytest
import scipy.linalg
import torch

from tsm.bench import digits_data as dd
from tsm.bench import metrics
from tsm.errors import TsmError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench") / "digit_net.safetensors"


@pytest.fixture(scope="module")
def net(cache):
    return metrics.load_or_train_digit_net(cache)  # trained once per session (about 10 s)


@pytest.fixture(scope="module")
def test_set():
    return metrics.colorized_split("test", seed=1)  # images, digits, fg names, bg names


@pytest.fixture(scope="module")
def train_set():
    return metrics.colorized_split("train", seed=2)


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def test_digit_split_is_fixed_stratified_and_disjoint():
    train, train_labels = dd.load_digit_split("train")
    test, test_labels = dd.load_digit_split("test")
    assert train.shape == (1397, 8, 8) and test.shape == (400, 8, 8)
    assert train.dtype == np.float32 and train.min() == 0 and train.max() == 1
    assert np.bincount(test_labels).tolist() == [40] * 10
    again, _ = dd.load_digit_split("test")
    np.testing.assert_array_equal(test, again)
    train_rows = {row.tobytes() for row in train.reshape(len(train), -1)}
    assert not any(row.tobytes() in train_rows for row in test.reshape(len(test), -1))
    with pytest.raises(TsmError, match="unknown split"):
        dd.load_digit_split("val")


def test_colorize_maps_gray_to_background_and_foreground():
    gray = torch.tensor([[0.0, 1.0], [0.5, 0.25]])[None].expand(2, 2, 2)  # (2, 2, 2)
    fg, bg = dd.PALETTE_RGB[[0, 1]], dd.PALETTE_RGB[[2, 3]]  # red on blue, green on yellow
    pixels = dd.colorize(gray, fg, bg)  # (2, 3, 2, 2)
    assert pixels.shape == (2, 3, 2, 2)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue
    torch.testing.assert_close(pixels[0, :, 0, 1], torch.tensor([1.0, -1.0, -1.0]))  # red
    torch.testing.assert_close(pixels[1, :, 1, 0], torch.tensor([0.0, 1.0, -1.0]))  # halfway yellow -> green


def test_target_combos_hold_out_unseen_triples_of_seen_pairs():
    train, test = dd.target_combos("train"), dd.target_combos("test")
    assert len(train) == 240 and len(test) == 60
    assert not set(train) & set(test)
    everything = {(d, f, b) for d in range(10) for f in dd.COLORS for b in dd.COLORS if f != b}
    assert set(train) | set(test) == everything
    assert {d for d, _, _ in train} == set(range(10))
    assert {f for _, f, _ in train} == {b for _, _, b in train} == set(dd.COLORS)
    for d, f, b in test:  # every pair inside a held-out triple is seen in training
        assert any(t[:2] == (d, f) for t in train)
        assert any((t[0], t[2]) == (d, b) for t in train)
        assert any(t[1:] == (f, b) for t in train)


def test_prompts_and_tokenizer_roundtrip():
    assert dd.source_prompt(3) == "digit 3"
    assert dd.target_prompt(3, "red", "blue") == "red 3 on blue"
    assert dd.parse_target_prompt("red 3 on blue") == (3, "red", "blue")
    with pytest.raises(TsmError, match="not a target prompt"):
        dd.parse_target_prompt("digit 3")
    prompts = ["digit 3", "magenta 0 on cyan"]
    ids = dd.tokenize(prompts)
    assert ids.shape == (2, 6) and ids.dtype == torch.long
    assert ids[0].tolist() == [dd.TOKEN_ID[w] for w in ["<bos>", "digit", "3", "<eos>", "<pad>", "<pad>"]]
    assert dd.detokenize(ids) == prompts
    with pytest.raises(TsmError, match="'purple'"):
        dd.tokenize(["purple 3 on blue"])
    with pytest.raises(TsmError, match="at most 4"):
        dd.tokenize(["red 3 on blue on red"])


def test_batches_follow_their_prompts(net):
    images, labels = dd.load_digit_split("train")
    g = torch.Generator().manual_seed(0)
    pixels, prompts = dd.make_source_batch(images, labels, 256, g)
    assert pixels.shape == (256, 3, 8, 8) and pixels.min() >= -1 and pixels.max() <= 1
    assert all(p.startswith("digit ") for p in prompts)  # the prompt names no colour
    # the background is black, or a quarter of the time another palette colour than the digit's
    fg, bg = dd.source_colors(2000, torch.Generator().manual_seed(1))
    black = (bg == 0).all(dim=1)
    on_palette = (bg[:, None] == dd.PALETTE_RGB[None]).all(dim=2).any(dim=1)
    assert (black | (on_palette & (bg != fg).any(dim=1))).all()
    assert abs((~black).float().mean().item() - dd.COLORED_BACKGROUND) < 0.03
    assert (pixels.amax(dim=(2, 3)) > 0).any(dim=1).all()  # and the digit is coloured

    combos = dd.target_combos("train")
    pixels, prompts = dd.make_target_batch(images, labels, combos, 128, g)
    parsed = [dd.parse_target_prompt(p) for p in prompts]
    assert all(c in combos for c in parsed)
    assert metrics.color_accuracy(pixels, [f for _, f, _ in parsed], [b for _, _, b in parsed])["both"] == 1
    assert metrics.digit_accuracy(net, pixels, [d for d, _, _ in parsed]) >= 0.95


def test_post_pretraining_set_is_half_source_half_attribute_binding_in_random_order(net):
    from tsm.bench.digits import eval_set, train_batch

    pixels, prompts = train_batch("post", 64, torch.Generator().manual_seed(0))
    assert pixels.shape == (64, 3, 8, 8) and len(prompts) == 64
    named = [p for p in prompts if not p.startswith("digit ")]
    assert len(named) == 32  # half each
    assert {dd.parse_target_prompt(p) for p in named} <= set(dd.target_combos("train"))
    assert (
        any(p.startswith("digit ") for p in prompts[32:]) and named[0] in prompts[:32]
    )  # mixed, not in blocks
    where = [i for i, p in enumerate(prompts) if p in set(named)]
    acc = metrics.color_accuracy(
        pixels[where], [prompts[i].split()[0] for i in where], [prompts[i].split()[3] for i in where]
    )
    assert acc["both"] == 1  # each named sample is drawn in its prompt's colours
    assert metrics.digit_accuracy(net, pixels, [int(p.split()[1]) for p in prompts]) >= 0.9

    prompts, seeds, reference, combos = eval_set("post", 2)
    assert len(prompts) == len(seeds) == len(reference) == 120  # 60 source + 60 held-out combos
    source = [c for c in combos if not c[1]]
    held = [c for c in combos if c[1]]
    assert len(source) == len(held) == 60 and set(held) == set(dd.target_combos("test"))
    idx = [i for i, c in enumerate(combos) if c[1]]
    acc = metrics.color_accuracy(reference[idx], [c[1] for c in held], [c[2] for c in held])
    assert acc["both"] == 1  # the references follow the named colours
    assert [p for p in prompts if p.startswith("digit ")] == [f"digit {d}" for d, _, _ in source]


# ----------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_forms():
    a = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)).double()
    assert abs(metrics.frechet_distance(a, a)) < 1e-8
    mu = torch.arange(8, dtype=torch.float64) / 4
    cov_trace = np.trace(np.cov(a.numpy(), rowvar=False))
    # b = s a + mu has mean shifted by mu and covariance s^2 C: distance |mu + (s-1) mean_a|^2 + (1-s)^2 tr C
    for s in (1.0, 0.5, 3.0):
        expected = ((mu + (s - 1) * a.mean(0)) ** 2).sum().item() + (1 - s) ** 2 * cov_trace
        assert metrics.frechet_distance(a, s * a + mu) == pytest.approx(expected, rel=1e-8)
    # against scipy's general sqrtm for two unrelated covariances
    b = (
        torch.randn(400, 8, generator=torch.Generator().manual_seed(1)).double()
        @ torch.randn(8, 8, generator=torch.Generator().manual_seed(2)).double()
    )
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    diff = (a.mean(0) - b.mean(0)).numpy()
    expected = diff @ diff + np.trace(ca + cb) - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_digit_net_reads_held_out_digits(net, test_set):
    images, digits, _, _ = test_set
    assert metrics.digit_accuracy(net, images, digits) >= 0.95


def test_fid_separates_real_digits_from_noise_and_wrong_digits(net, test_set, train_set):
    test_images, test_digits, _, _ = test_set
    train_images, train_digits, _, _ = train_set
    real = metrics.fid(net, test_images, train_images)
    noise = torch.rand(test_images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert real < metrics.fid(net, noise, train_images) / 5
    # class-conditional: test digits of class c against train digits of class c, or of class (c+1) % 10
    # (as if a model drew the wrong digit for every prompt), averaged over the 10 classes
    matched = metrics.class_fid(net, test_images, test_digits, train_images, train_digits)
    shuffled = metrics.class_fid(net, test_images, (test_digits + 1) % 10, train_images, train_digits)
    assert matched < shuffled / 5


def test_colors_are_measured_exactly(test_set):
    images, _, fg, bg = test_set
    assert metrics.color_accuracy(images, fg, bg) == {"fg": 1.0, "bg": 1.0, "both": 1.0}
    rng = random.Random(0)
    wrong = metrics.color_accuracy(images, rng.sample(fg, len(fg)), rng.sample(bg, len(bg)))
    assert wrong["fg"] < 0.3 and wrong["bg"] < 0.3 and wrong["both"] < 0.1  # chance: 1/6, 1/6, 1/30
    blank = dd.colorize(torch.zeros(1, 8, 8), dd.PALETTE_RGB[[0]], dd.PALETTE_RGB[[2]])  # all blue, no ink
    assert metrics.measure_colors(blank) == (["blue"], ["blue"])  # fg == bg: never what a target asks for


def test_digit_net_cache_reloads_and_retrains_when_corrupt(net, cache, tmp_path):
    again = metrics.load_or_train_digit_net(cache)  # the file the fixture wrote: loaded, not retrained
    for key, value in net.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)
    broken = tmp_path / "net.safetensors"
    broken.write_bytes(b"not a safetensors file")
    small = metrics.load_or_train_digit_net(broken, steps=3)
    reloaded = metrics.load_or_train_digit_net(broken, steps=3)
    torch.testing.assert_close(reloaded.fc.weight, small.fc.weight, rtol=0, atol=0)
    assert metrics.load_or_train_digit_net(broken, steps=4).fc.weight.ne(small.fc.weight).any()


def test_bold_widens_every_stroke_by_one_column_and_ink_sees_it():
    gray = torch.zeros(1, 8, 8)
    gray[0, 2:6, 3] = 1.0  # a vertical stroke in column 3
    thick = dd.bold(gray)
    assert thick[0, 2:6, 3].eq(1).all() and thick[0, 2:6, 4].eq(1).all() and thick.sum() == 8
    images, _ = dd.load_digit_split("test")
    thin = dd.colorize(torch.as_tensor(images[:50]), torch.ones(50, 3), torch.zeros(50, 3))
    bold = dd.colorize(dd.bold(images[:50]), torch.ones(50, 3), torch.zeros(50, 3))
    assert metrics.ink(bold).mean() > metrics.ink(thin).mean() + 0.1
    assert metrics.ink(thin).shape == (50,)
    # a blue digit on yellow is darker than its background: coverage is measured from the background colour
    blue, yellow = (
        torch.tensor([[0.0, 0.0, 1.0]]).repeat(50, 1),
        torch.tensor([[1.0, 1.0, 0.0]]).repeat(50, 1),
    )
    on_yellow = dd.colorize(torch.as_tensor(images[:50]), blue, yellow)
    torch.testing.assert_close(metrics.ink(on_yellow), metrics.ink(thin))


def test_write_folder_writes_each_task_and_refuses_unknown_ones(tmp_path):
    captions = {}
    for task in dd.WRITE_TASKS:
        folder = dd.write_folder(tmp_path / task, task, n=8)
        captions[task] = sorted(p.read_text().strip() for p in folder.glob("*.txt"))
        assert len(list(folder.glob("*.png"))) == 8
    named = {t: sum(not c.startswith("digit ") for c in cs) for t, cs in captions.items()}
    assert named == {"source": 0, "post": 4, "domain": 8}
    with pytest.raises(TsmError, match="unknown task 'bold'"):
        dd.write_folder(tmp_path / "x", "bold", n=2)
