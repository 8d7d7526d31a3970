"""The prompts the chapters write: "a cat", "a cat and a kite", and a concept composed with partner nouns."""

from __future__ import annotations


def article(noun: str) -> str:
    """"a cat", "an umbrella"."""
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def pair_prompt(a: str, b: str) -> str:
    return f"{article(a)} and {article(b)}"
