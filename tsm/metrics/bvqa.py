"""T2I-CompBench's B-VQA (Huang et al. 2023), computed as their ``BLIPvqa_eval/`` code computes it.

For every image: the prompt's noun chunks (spaCy ``en_core_web_sm``; chunks "top", "the side", "the left",
"the right" dropped; the first 8 kept, their ``--np_num``) are asked one at a time as "{chunk}?" of BLIP VQA;
each answer is P(yes) / (P(yes) + P(no)) from the softmax over the vocabulary of the first decoder token; the
answers, each rounded to 4 decimals as their result files store them, are multiplied (float32) and the product
rounded to 4 decimals; an image with no chunk scores 1. B-VQA is the mean over the images.

The steps their code takes, kept here: the question lower-cased and stripped of ``.!"()*#:;~`` (BLIP's
``pre_question``), tokenised with at most 35 tokens, its first token ([CLS]) replaced by BLIP's [ENC]; the
image converted to RGB, resized to 480x480 with PIL's bicubic filter (torchvision's ``Resize`` on a PIL
image), scaled to [0, 1] and normalised with BLIP's mean and std; the decoder started from [DEC] (the config's
``bos_token_id``) with the question's attention mask. yes / no are looked up in the processor's tokenizer
(BERT's ids 2748 / 2053, what their code hard-codes).

The model: transformers' `BlipForQuestionAnswering`, by default ``Salesforce/blip-vqa-capfilt-large`` —
transformers' conversion of exactly their checkpoint ``model_base_vqa_capfilt_large.pth`` (ViT-B; the
conversion script loads that file into BLIP's ``blip_vqa`` and copies it over). The conversion stored the
position embeddings interpolated from 480 to 384 pixels (BLIP's ``load_checkpoint`` does this when the sizes
differ); at 480 pixels they are interpolated back (``interpolate_pos_encoding``), so the ViT input is theirs but
its position embeddings are a bicubic round trip of theirs. ``image_size=384`` uses the stored ones instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from tsm.errors import TsmError, shorten
from tsm.metrics.folder import Item, ScoreCache, load_pretrained, open_rgb, text_key

DEFAULT_MODEL = "Salesforce/blip-vqa-capfilt-large"
IMAGE_SIZE = 480  # their configs/vqa.yaml image_size
MAX_QUESTIONS = 8  # their --np_num: noun chunks past the 8th are not asked
MAX_QUESTION_TOKENS = 35
SKIPPED_CHUNKS = ("top", "the side", "the left", "the right")  # their list
SPACY_MODEL = "en_core_web_sm"
INSTALL = (
    "pip install -e '.[eval]' && python -m spacy download en_core_web_sm (or give the questions with "
    "--questions FILE)"
)


# ---------------------------------------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------------------------------------
def spacy_chunker() -> Callable[[str], list[str]]:
    """prompt -> its noun chunks, by spaCy's ``en_core_web_sm`` as T2I-CompBench finds them."""
    try:
        import spacy
    except ImportError:
        raise TsmError(
            f"B-VQA finds a prompt's noun chunks with spaCy, which is not installed: {INSTALL}"
        ) from None
    try:
        nlp = spacy.load(SPACY_MODEL)
    except OSError:
        raise TsmError(f"spaCy's model {SPACY_MODEL} is not installed: {INSTALL}") from None
    return lambda prompt: [chunk.text for chunk in nlp(prompt).noun_chunks]


def chunk_questions(chunks: Sequence[str]) -> list[str]:
    """Noun chunks -> the questions T2I-CompBench asks: "{chunk}?", their skip list out, the first 8."""
    return [f"{c}?" for c in chunks if c not in SKIPPED_CHUNKS][:MAX_QUESTIONS]


def read_questions(path: str | Path) -> dict[str, list[str]]:
    """A ``--questions`` file: a JSON object, prompt -> its questions (["a red car?", "a blue bench?"])."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TsmError(f"cannot read --questions {path} as JSON ({type(e).__name__})") from None
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(q, str) for q in v) for v in data.values()
    )
    if not ok:
        raise TsmError(
            f'--questions {path} must be a JSON object of prompt -> list of questions: {{"a red car": ["a red car?"]}}'
        )
    return data


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's ``pre_question``: lower case, ``.!"()*#:;~`` removed, trailing spaces off, at most 50 words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    return " ".join(question.split(" ")[:max_words])


def questions_for(
    items: Sequence[Item],
    questions: dict[str, list[str]] | None,
    chunker: Callable[[str], list[str]] | None,
) -> list[list[str]]:
    """Each image's questions: from ``questions`` (prompt -> list) when given, else the prompt's noun chunks."""
    out, cache = [], {}
    for item in items:
        prompt = item.prompt or ""
        if prompt not in cache:
            if questions is not None:
                if prompt not in questions:
                    raise TsmError(f"--questions has no entry for the prompt {shorten(prompt)!r}; add one")
                cache[prompt] = list(questions[prompt])
            else:
                chunker = chunker or spacy_chunker()
                cache[prompt] = chunk_questions(chunker(prompt))
        out.append(cache[prompt])
    if not any(out):
        raise TsmError(
            "no prompt has a noun chunk to ask about, so B-VQA would be 1 for every image; give prompts that "
            "name objects (T2I-CompBench's color/shape/texture files) or --questions FILE"
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------------------------------------
def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """First-token logits (N, V) -> P(yes) / (P(yes) + P(no)) (N,), the softmax taken over the whole vocabulary
    as their ``vqa_prob`` takes it."""
    prob = torch.softmax(logits.float(), dim=-1)
    return prob[:, yes_id] / (prob[:, yes_id] + prob[:, no_id])


def image_score(answers: Sequence[float]) -> float:
    """One image's B-VQA from its answers: each rounded to 4 decimals (their result files hold '{:.4f}'
    strings), multiplied in float32, the product rounded to 4 decimals; no answer (no chunk) -> 1."""
    product = torch.ones((), dtype=torch.float32)
    for p in answers:
        product = product * torch.tensor(float(f"{p:.4f}"), dtype=torch.float32)
    return float(f"{product.item():.4f}")


def blip_pixels(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB image -> (3, size, size): their ``Resize((size, size), BICUBIC)``, ``ToTensor``, ``Normalize``."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------
class BlipVQA:
    """A `BlipForQuestionAnswering` and its processor, answering yes/no questions about images."""

    def __init__(
        self, model_id: str = DEFAULT_MODEL, device: Any = "cpu", image_size: int = IMAGE_SIZE
    ) -> None:
        from transformers import BlipForQuestionAnswering

        self.model, processor, self.revision = load_pretrained(
            model_id, BlipForQuestionAnswering, "blip", "BLIP VQA model", DEFAULT_MODEL, device
        )
        self.model_id, self.device, self.image_size = model_id, device, image_size
        self.tokenizer = processor.tokenizer
        self.mean, self.std = processor.image_processor.image_mean, processor.image_processor.image_std
        vocab = self.tokenizer.get_vocab()
        missing = [w for w in ("yes", "no") if w not in vocab]
        if missing:
            raise TsmError(
                f"{shorten(model_id)}'s tokenizer has no token {missing[0]!r}: not a BLIP VQA tokenizer"
            )
        self.yes_id, self.no_id = vocab["yes"], vocab["no"]
        text = self.model.config.text_config
        # BLIP's tokenizer adds [DEC] (the decoder's bos) then [ENC]; transformers' tokenizer may lack [ENC]
        self.enc_id = vocab.get("[ENC]", text.bos_token_id + 1)
        if not 0 <= self.enc_id < text.vocab_size:
            raise TsmError(
                f"{shorten(model_id)} has no [ENC] token (vocabulary {text.vocab_size}); not a BLIP model"
            )
        self.start_id = text.bos_token_id
        self.interpolate = image_size != self.model.config.vision_config.image_size

    def settings(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "revision": self.revision,
            "image_size": self.image_size,
            "resize": "PIL bicubic",
            "position_embeddings": "interpolated" if self.interpolate else "as stored",
            "max_questions": MAX_QUESTIONS,
            "max_question_tokens": MAX_QUESTION_TOKENS,
            "token_ids": {"yes": self.yes_id, "no": self.no_id, "enc": self.enc_id, "dec": self.start_id},
        }

    @torch.no_grad()
    def answer(self, pixels: torch.Tensor, image_index: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) (Q,) for question q about image ``image_index[q]`` of ``pixels`` (B, 3, S, S)."""
        m = self.model
        image_embeds = m.vision_model(
            pixel_values=pixels.to(self.device), interpolate_pos_encoding=self.interpolate
        ).last_hidden_state  # (B, L, D)
        image_embeds = image_embeds[image_index.to(self.device)]  # (Q, L, D)
        tokens = self.tokenizer(
            [pre_question(q) for q in questions],
            padding="longest",
            truncation=True,
            max_length=MAX_QUESTION_TOKENS,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        ids[:, 0] = self.enc_id
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        states = m.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # (Q, T, D)
        start = torch.full((len(questions), 1), self.start_id, dtype=torch.long, device=self.device)
        logits = m.text_decoder(
            input_ids=start, encoder_hidden_states=states, encoder_attention_mask=mask, return_dict=True
        ).logits[:, 0]  # (Q, V)
        return yes_probability(logits, self.yes_id, self.no_id).cpu()


def bvqa(
    items: Sequence[Item],
    model: BlipVQA,
    questions: dict[str, list[str]] | None = None,
    chunker: Callable[[str], list[str]] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """B-VQA of the images ``items`` (each with its prompt): the score, each image's questions, answers and
    score, the settings. Answers already in the cache (same image bytes, question, model and settings) are
    not asked again."""
    asked = questions_for(items, questions, chunker)
    settings = model.settings()
    cache = ScoreCache("bvqa", settings)
    todo = [i for i, qs in enumerate(asked) if any(text_key(items[i].key, q) not in cache for q in qs)]
    bar = tqdm(total=len(todo), desc="B-VQA", unit="image", disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        pairs = [
            (b, q) for b, i in enumerate(batch) for q in asked[i] if text_key(items[i].key, q) not in cache
        ]
        pixels = torch.stack(
            [blip_pixels(open_rgb(items[i].path), model.image_size, model.mean, model.std) for i in batch]
        )
        p = model.answer(pixels, torch.tensor([b for b, _ in pairs]), [q for _, q in pairs])
        cache.add({text_key(items[batch[b]].key, q): p[k : k + 1] for k, (b, q) in enumerate(pairs)})
        bar.update(len(batch))
    bar.close()
    per_image = []
    for item, qs in zip(items, asked, strict=True):
        answers = [float(cache[text_key(item.key, q)]) for q in qs]
        per_image.append(
            {
                "file": str(item.path),
                "prompt": item.prompt,
                "questions": qs,
                "answers": answers,
                "score": image_score(answers),
            }
        )
    scores = [r["score"] for r in per_image]
    return {
        "metric": "bvqa",
        "score": float(np.mean(scores)),
        "images": len(items),
        "without_questions": sum(not qs for qs in asked),
        "questions_from": "file" if questions is not None else f"spaCy {SPACY_MODEL} noun chunks",
        **settings,
        "per_image": per_image,
    }
