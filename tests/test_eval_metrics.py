"""The metrics of `tsm eval` on tiny random models written with save_pretrained: B-VQA by hand on fixed logits,
CLIPScore and CLIP-Temp against a direct computation, the Frechet distance against scipy and a closed form,
and the FID Inception-v3's architecture against the real weights files' key names and shapes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import clip_tokenizer

from tsm.errors import TsmError
from tsm.metrics import bvqa, clipscore, fid, folder, inception

BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "a", "red", "car", "blue", "bench"]
BLIP_WORDS += ["green", "ball", "?", "[DEC]", "[ENC]"]


def write_tiny_blip(path: Path, image_size: int = 32) -> Path:
    """A random BlipForQuestionAnswering (hidden 32, one layer, 32-pixel images) with a BERT-style tokenizer that
    has yes / no, [DEC] (the decoder's bos) and [ENC], and a BLIP processor: what from_pretrained reads."""
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(BLIP_WORDS) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    text = dict(small, vocab_size=len(BLIP_WORDS), encoder_hidden_size=32, max_position_embeddings=64)
    text.update(bos_token_id=BLIP_WORDS.index("[DEC]"), pad_token_id=0, sep_token_id=3)
    config = BlipConfig(
        text_config=text, vision_config=dict(small, image_size=image_size, patch_size=8), projection_dim=32
    )
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(path)
    processor = BlipProcessor(
        BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer
    )
    processor.save_pretrained(path)
    return path


def write_tiny_clip(path: Path) -> Path:
    """A random CLIPModel (hidden 32, 32-pixel images, projection 16) with the character-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=74, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(images, clip_tokenizer()).save_pretrained(path)
    return path


def write_images(
    root: Path, prompts: list[str], size: int = 32, seed: int = 0, width: int | None = None
) -> Path:
    """Random RGB PNGs 0000.png ... with a .txt sidecar each (the data-folder convention)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, prompt in enumerate(prompts):
        pixels = rng.integers(0, 256, (size, width or size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:04d}.png")
        if prompt is not None:
            (root / f"{i:04d}.txt").write_text(prompt)
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TSM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"blip": write_tiny_blip(root / "blip"), "clip": write_tiny_clip(root / "clip")}


# ---------------------------------------------------------------------------------------------------------
# B-VQA
# ---------------------------------------------------------------------------------------------------------
def test_bvqa_by_hand_on_fixed_logits(tiny, tmp_path):
    """The decoder's head zeroed and its bias fixed: every first-token distribution is softmax(bias), so every
    answer is e^2 / (e^2 + e^0.5); two questions multiply (each rounded to 4 decimals first), none scores 1."""
    model = bvqa.BlipVQA(str(tiny["blip"]), image_size=32)
    head = model.model.text_decoder.cls.predictions
    bias = torch.zeros(len(BLIP_WORDS))
    bias[BLIP_WORDS.index("yes")], bias[BLIP_WORDS.index("no")], bias[BLIP_WORDS.index("car")] = 2.0, 0.5, 3.0
    with torch.no_grad():
        head.decoder.weight.zero_()
        head.decoder.bias.copy_(bias)
        head.bias.copy_(bias)
    items = folder.scan(
        write_images(tmp_path / "imgs", ["a red car", "a blue bench", "nothing"]), need_prompts=True
    )
    asked = {"a red car": ["a red car?", "a green ball?"], "a blue bench": ["a blue bench?"], "nothing": []}
    result = bvqa.bvqa(items, model, questions=asked, progress=False)

    p = math.exp(2.0) / (math.exp(2.0) + math.exp(0.5))  # the other logits cancel in the ratio: 0.8175744...
    assert [r["answers"] for r in result["per_image"]] == [
        pytest.approx([p, p], abs=1e-6),
        pytest.approx([p], abs=1e-6),
        [],
    ]
    rounded = round(p, 4)  # 0.8176
    expected = [round(rounded * rounded, 4), rounded, 1.0]  # 0.6685, 0.8176, 1
    assert [r["score"] for r in result["per_image"]] == expected
    assert result["score"] == pytest.approx(sum(expected) / 3, abs=1e-12)
    assert (
        result["without_questions"] == 1
        and result["token_ids"]["yes"] == 5
        and result["token_ids"]["enc"] == 16
    )


def test_bvqa_arithmetic_and_question_rules():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]])
    p = bvqa.yes_probability(logits, yes_id=2, no_id=1)
    assert p.tolist() == pytest.approx([math.e**2 / (math.e**2 + math.e), math.e**-1 / (math.e**-1 + 1)])
    assert bvqa.image_score([]) == 1.0
    assert bvqa.image_score([0.5, 0.5, 0.5]) == 0.125
    assert bvqa.image_score([0.33333, 0.66666]) == round(0.3333 * 0.6667, 4)
    assert bvqa.pre_question('A "Red" Car.?  ') == "a red car?"
    chunks = ["a red car", "top", "the left", *[f"thing {k}" for k in range(9)]]
    assert bvqa.chunk_questions(chunks) == ["a red car?", *[f"thing {k}?" for k in range(7)]]  # 8 at most


def test_bvqa_questions_from_a_monkeypatched_chunker_and_the_no_chunk_errors(tmp_path):
    items = folder.scan(write_images(tmp_path / "i", ["a red car on the left", "sky"]), need_prompts=True)
    fake = {"a red car on the left": ["a red car", "the left"], "sky": []}
    assert bvqa.questions_for(items, None, fake.__getitem__) == [["a red car?"], []]
    with pytest.raises(TsmError, match="no prompt has a noun chunk"):
        bvqa.questions_for(items, None, lambda prompt: [])
    with pytest.raises(TsmError, match="no entry for the prompt 'sky'"):
        bvqa.questions_for(items, {"a red car on the left": ["a red car?"]}, None)


def test_missing_spacy_is_one_line_naming_the_download(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "spacy", None)  # import spacy -> ImportError
    with pytest.raises(TsmError) as e:
        bvqa.spacy_chunker()
    assert "\n" not in str(e.value) and "python -m spacy download en_core_web_sm" in str(e.value)


def test_blip_pixels_resize_as_the_processor_does(tiny):
    """PIL bicubic to the side, /255, BLIP's mean and std: what the model's own (PIL) image processor gives."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny["blip"])
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    ours = bvqa.blip_pixels(
        image, 32, processor.image_processor.image_mean, processor.image_processor.image_std
    )
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 32, 32) and torch.allclose(ours, theirs, atol=1e-5)


def test_a_model_of_the_wrong_kind_is_one_line(tiny):
    with pytest.raises(TsmError, match="is not a BLIP VQA model .*model_type 'clip'"):
        bvqa.BlipVQA(str(tiny["clip"]))
    with pytest.raises(TsmError, match="is not a CLIP model .*model_type 'blip'"):
        clipscore.Clip(str(tiny["blip"]))
    with pytest.raises(TsmError, match="cannot load CLIP model"):
        clipscore.Clip(str(tiny["blip"] / "nowhere"))


# ---------------------------------------------------------------------------------------------------------
# CLIPScore
# ---------------------------------------------------------------------------------------------------------
def _direct_clip(path: Path, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """torchmetrics' computation, written out: projected features, L2-normalised, 100 * their dot product."""
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    with torch.no_grad():
        img = clipscore._features(model.get_image_features(**processor(images=images, return_tensors="pt")))
        tok = processor(text=texts, return_tensors="pt", padding=True)
        txt = clipscore._features(model.get_text_features(tok["input_ids"], tok["attention_mask"]))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return 100 * (img * txt).sum(-1)


def test_clipscore_equals_the_direct_computation(tiny, tmp_path):
    prompts = ["a red car", "a cat", "a red car"]
    items = folder.scan(write_images(tmp_path / "imgs", prompts), need_prompts=True)
    result = clipscore.clip_score(items, clipscore.Clip(str(tiny["clip"])), progress=False)
    direct = _direct_clip(tiny["clip"], [folder.open_rgb(i.path) for i in items], prompts)
    assert [r["score"] for r in result["per_image"]] == pytest.approx(direct.tolist(), abs=1e-4)
    assert result["score"] == pytest.approx(max(direct.mean().item(), 0.0), abs=1e-4)  # the mean is clamped


def test_clip_temp_and_per_frame_clipscore_of_clips(tiny, tmp_path):
    """A clip is 3 frames side by side: CLIPScore is the mean over its frames, CLIP-Temp the mean cosine of
    consecutive frames' image features."""
    write_images(tmp_path / "clips", ["a red car", "a cat"], size=32, width=96)
    items = folder.scan(tmp_path / "clips", need_prompts=True)
    result = clipscore.clip_score(items, clipscore.Clip(str(tiny["clip"])), frames=3, progress=False)
    from transformers import AutoProcessor, CLIPModel

    model, processor = (
        CLIPModel.from_pretrained(tiny["clip"]).eval(),
        AutoProcessor.from_pretrained(tiny["clip"]),
    )
    temps = []
    for item, row in zip(items, result["per_image"], strict=True):
        frames = folder.split_frames(folder.open_rgb(item.path), 3)
        assert row["score"] == pytest.approx(
            _direct_clip(tiny["clip"], frames, [item.prompt] * 3).mean().item(), abs=1e-4
        )
        with torch.no_grad():
            f = clipscore._features(model.get_image_features(**processor(images=frames, return_tensors="pt")))
        f = f / f.norm(dim=-1, keepdim=True)
        temps.append(((f[0] @ f[1]) + (f[1] @ f[2])).item() / 2)
        assert row["clip_temp"] == pytest.approx(temps[-1], abs=1e-5)
    assert result["clip_temp"] == pytest.approx(np.mean(temps), abs=1e-5)
    with pytest.raises(TsmError, match="does not split into --frames 5"):
        folder.split_frames(folder.open_rgb(items[0].path), 5)


# ---------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------
def test_frechet_distance_equals_scipy_reference_and_closed_forms():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 8)), rng.normal(1.0, 2.0, size=(80, 8)) @ rng.normal(size=(8, 8))
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    root = linalg.sqrtm(s1 @ s2)
    root = (root[0] if isinstance(root, tuple) else root).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-10)
    # an eigenvalue route to the same number (the digits benchmark's), and 1-d Gaussians by hand
    from tsm.bench.metrics import frechet_distance as eigen_route

    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(eigen_route(a, b), rel=1e-8)
    assert fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == (
        pytest.approx(4 + 4 + 9 - 2 * 6)
    )
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_singular_covariances_take_pytorch_fids_eps_route():
    """3 points in 8 dimensions: a rank-2 covariance; the value is finite and equals the eps-nudged formula."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    (mu1, s1), (mu2, s2) = fid.statistics(rng.normal(size=(3, 8))), fid.statistics(rng.normal(size=(3, 8)))
    value = fid.frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(value)
    plain = linalg.sqrtm(s1 @ s2)
    plain = plain[0] if isinstance(plain, tuple) else plain
    if not np.isfinite(plain).all():
        eye = np.eye(8) * fid.EPS
        plain = linalg.sqrtm((s1 + eye) @ (s2 + eye))
        plain = plain[0] if isinstance(plain, tuple) else plain
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(plain.real)
    assert value == pytest.approx(expected, rel=1e-8)


def test_tensorflow_bilinear_resize_by_hand():
    """TF 1.x: source = destination * in / out, no half-pixel shift: [a, b] -> [a, (a+b)/2, b, b]."""
    x = torch.tensor([[[[0.0, 8.0], [16.0, 24.0]]]])
    out = inception.resize_like_tensorflow(x, size=4)
    assert out[0, 0, 0].tolist() == [0.0, 4.0, 8.0, 8.0]
    assert out[0, 0, :, 0].tolist() == [0.0, 8.0, 16.0, 16.0]
    assert out[0, 0, 1, 1].item() == 12.0


def test_centre_crop_is_the_middle_at_full_resolution():
    image = Image.fromarray(np.arange(6 * 9, dtype=np.uint8).reshape(6, 9)).convert("RGB")
    patch = fid.centre_crop(image, size=4)
    assert np.asarray(patch)[..., 0].tolist() == np.arange(54).reshape(6, 9)[1:5, 2:6].tolist()
    with pytest.raises(TsmError, match="use --metric fid"):
        fid.centre_crop(image, size=7)


def test_the_inception_takes_the_real_weights_files_keys_and_shapes(tmp_path):
    """The FID Inception at random init: the key names and shapes of pytorch-fid's / torch-fidelity's weights
    file; saved as both .pth and .safetensors it loads back and gives the same 2048-d features."""
    torch.manual_seed(0)
    net = inception.FIDInceptionV3().eval()
    state = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert shapes["fc.weight"] == (1008, 2048) and not any(k.startswith("AuxLogits") for k in state)
    for k, v in state.items():  # BatchNorm statistics away from 0/1, so a wrong load would show
        if k.endswith(("running_mean", "running_var")):
            v.copy_(torch.rand_like(v) + (0.5 if k.endswith("var") else 0.0))
    torch.save(state, tmp_path / "pt_inception.pth")
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "w.safetensors"
    )
    images = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    with torch.no_grad():
        expected = net(inception.prepare(images))
    assert expected.shape == (2, 2048)
    for name in ("pt_inception.pth", "w.safetensors"):
        loaded = inception.load_fid_inception(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(loaded(inception.prepare(images)), expected)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(TsmError, match="not the FID Inception-v3's state dict"):
        inception.load_fid_inception(tmp_path / "bad.pth")
