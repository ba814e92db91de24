"""The toy world's CLIP-style BPE tokenizer, built from the caption corpus the renderer writes.

Merges are learned greedily by corpus frequency (frequent words are merged first, so they get low
ids, as in CLIP's vocabulary), every byte stays in the vocabulary (any text tokenizes), and a few
dozen short tokens that never occur in any caption are appended at the rare (high-id) end: the
rare-token identifier picker (`data.resolve_identifier`) finds genuinely unused tokens there, as
the paper's recipe does in T5's or CLIP's vocabulary.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from dreambooth_lib.tiny import write_clip_tokenizer
from dreambooth_lib.toyworld import render

MAX_LENGTH = 16  # tokens per prompt: the longest caption has 12 words plus start/end
NUM_RARE = 40  # short never-seen tokens appended at the rare end of the vocabulary
CONSONANTS = "bcdfghjklmnpqrstvwxz"


def all_captions() -> list[str]:
    """Every caption the renderer can write (the pretraining corpus, up to frequencies)."""
    captions = set()
    for style, cls, colour, context in itertools.product(render.STYLES, render.CLASSES, [None, *render.COLOURS],
                                                         [None, *render.CONTEXTS]):
        if colour and style != "photo":
            continue  # sketches are grey: their captions never name a colour
        spec = render.Spec(cls=cls, colour=colour or "red", context=context or "grass", style=style, pattern="plain",
                           size=0.3, cx=0.5, cy=0.5, angle=0.0, mention_colour=colour is not None,
                           mention_context=context is not None)
        captions.add(render.caption(spec))
    return sorted(captions)


def rare_tokens(corpus_words: set[str], n: int = NUM_RARE, seed: int = 0) -> list[str]:
    """n consonant-only 3-letter strings absent from the corpus (no English word, no caption word)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(list(CONSONANTS), size=3))
        if word not in corpus_words and word not in out:
            out.append(word)
    return out


def caption_words() -> list[str]:
    """The captions' words, frequent first (the lowest merge ranks and ids)."""
    counts = collections.Counter(word for caption in all_captions() for word in caption.split())
    return [w for w, _ in counts.most_common()]


def build_tokenizer(folder: str | Path, seed: int = 0) -> CLIPTokenizer:
    """Write vocab.json + merges.txt (+ tokenizer config) to `folder` and return the loaded tokenizer."""
    words = caption_words()
    return write_clip_tokenizer(words + rare_tokens(set(words), seed=seed), folder, model_max_length=MAX_LENGTH)
