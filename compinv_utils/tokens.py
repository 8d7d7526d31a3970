"""Words and their tokens: a placeholder's vectors, where a word sits in a prompt, and prompts as padded ids.

A placeholder learned with several vectors is the token ``<t>`` followed by ``<t>_1``, ``<t>_2`` …, as
diffusers' ``load_textual_inversion`` writes it; every function here expands it the same way.
"""
from __future__ import annotations

from typing import Sequence

import torch


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokens of a ``num_vectors``-vector placeholder: ``[token, token_1, …]``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def placeholder_vectors(tokenizer, word: str) -> list[str]:
    """``word`` and the extra vector tokens (``word_1`` …) the tokenizer knows for it."""
    vocab = tokenizer.get_vocab()
    words = [word]
    while f"{word}_{len(words)}" in vocab:
        words.append(f"{word}_{len(words)}")
    return words


def expand_placeholder(tokenizer, text: str, word: str) -> str:
    """``text`` with ``word`` written as all its vectors, as diffusers' loader expands a prompt."""
    words = placeholder_vectors(tokenizer, word)
    return text.replace(word, " ".join(words)) if len(words) > 1 else text


def token_ids(tokenizer, word: str) -> list[int]:
    """The ids of ``word`` (no special tokens); a multi-vector placeholder gives all its vectors."""
    if word in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(placeholder_vectors(tokenizer, word))
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"{word!r} has no tokens")
    return ids


def padded_ids(tokenizer, texts: str | Sequence[str], device=None) -> torch.Tensor:
    """``texts`` as the ids a CLIP text encoder reads: padded (and cut) to ``model_max_length``, ``(N, L)``."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids if device is None else ids.to(device)


def _check_readable(tokenizer, word: str, prompt: str, start: int, n: int, which: str = "") -> None:
    limit = tokenizer.model_max_length - 1  # the last position holds the end token
    if start + n > limit:
        raise ValueError(f"{word!r}{which} is at token {start} of the prompt {prompt!r}, past the {limit} tokens the "
                         "text encoder reads; shorten the prompt")


def _starts(ids: list[int], target: list[int]) -> list[int]:
    return [s for s in range(len(ids) - len(target) + 1) if ids[s:s + len(target)] == target]


def token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of ``word``'s token(s) in the tokenized ``prompt`` (the start token is at 0); a multi-vector
    placeholder gives all its vectors."""
    ids = tokenizer(expand_placeholder(tokenizer, prompt, word)).input_ids
    target = tokenizer(" ".join(placeholder_vectors(tokenizer, word)), add_special_tokens=False).input_ids
    starts = _starts(ids, target)
    if not starts:
        raise ValueError(f"{word!r} does not occur in the prompt {prompt!r}")
    _check_readable(tokenizer, word, prompt, starts[0], len(target))
    return list(range(starts[0], starts[0] + len(target)))


def word_positions(tokenizer, prompt: str, words: Sequence[str]) -> list[list[int]]:
    """Token positions of each word in the prompt (clear error when a word is absent). A word named twice ("a cat
    and a cat" with words ``["cat", "cat"]``) takes its occurrences in order: the second ``"cat"`` is the second
    cat of the prompt."""
    out = []
    for k, w in enumerate(words):
        first = token_indices(tokenizer, prompt, w)
        before = list(words[:k]).count(w)
        if before == 0:
            out.append(first)
            continue
        ids = tokenizer(expand_placeholder(tokenizer, prompt, w)).input_ids
        target = ids[first[0]:first[-1] + 1]
        starts = _starts(ids, target)
        if len(starts) <= before:
            raise ValueError(f"{w!r} is named {before + 1} times in words but occurs {len(starts)} time(s) in the "
                             f"prompt {prompt!r}: name each object of the prompt once per occurrence")
        _check_readable(tokenizer, w, prompt, starts[before], len(target), f" (occurrence {before + 1})")
        out.append(list(range(starts[before], starts[before] + len(target))))
    return out


def prompt_token_positions(tokenizer, prompt: str) -> list[int]:
    """Positions of the prompt's word tokens (no start, end or padding tokens)."""
    return list(range(1, len(tokenizer(prompt).input_ids) - 1))


def require_placeholder(tokenizer, token: str, num_vectors: int) -> list[str]:
    """The placeholder's tokens, or ``ValueError`` when the tokenizer does not know them yet (a loss that reads the
    placeholder runs inside :func:`~compinv_utils.inversion.invert`, which adds it)."""
    words = placeholder_tokens(token, num_vectors)
    missing = [w for w in words if w not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"placeholder token(s) {missing} are not in the tokenizer: use this loss inside invert() "
                         "(or add the placeholder first)")
    return words
