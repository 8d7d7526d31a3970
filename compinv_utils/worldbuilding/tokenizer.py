"""A small CLIP tokenizer for the toy world, built offline.

It has CLIP's byte-level alphabet (every byte, with and without the end-of-word marker ``</w>``),
so any text tokenizes, and byte-pair merges learnt on the toy world's caption words, so that each of
them is one token, exactly as in SD's tokenizer ("cat" -> ``cat</w>``).
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy byte-pair merges until every word is a single ``word</w>`` symbol."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(out)
        seqs = merged
    return merges


def build_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary is CLIP's byte alphabet plus merges for ``words``."""
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = learn_merges([w.lower() for w in words])
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    if len(tok) != len(vocab):
        raise RuntimeError(f"tokenizer built with {len(tok)} tokens, expected {len(vocab)}")
    return tok
