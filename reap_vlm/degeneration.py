"""Detectors for degenerate generations: loops, repetition, empty or non-text output. Pure functions."""

from __future__ import annotations

import itertools
import unicodedata
from collections import Counter


def repeated_ngram_ratio(tokens: list, n: int = 4) -> float:
    """Share of n-grams that occur more than once (0 = no repetition, → 1 = one phrase looping)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def distinct_n(tokens: list, n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_run(tokens: list) -> int:
    """Longest run of one token repeated back to back ("a a a a" → 4)."""
    best = run = 0
    prev = object()
    for t in tokens:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


def longest_repeated_substring(text: str, limit: int = 2000) -> int:
    """Length of the longest substring that occurs at least twice (suffix sorting; text cut to `limit`)."""
    text = text[:limit]
    suffixes = sorted(range(len(text)), key=lambda i: text[i:])
    best = 0
    for a, b in itertools.pairwise(suffixes):
        k = 0
        while a + k < len(text) and b + k < len(text) and text[a + k] == text[b + k]:
            k += 1
        best = max(best, k)
    return best


def garbage_share(text: str) -> float:
    """Share of characters that are replacement characters, controls (other than whitespace) or unassigned."""
    if not text:
        return 0.0
    bad = sum(
        1
        for ch in text
        if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cn", "Co", "Cs") and ch not in "\n\t\r")
    )
    return bad / len(text)


def analyse(
    text: str, token_ids: list[int], *, max_repeat_ratio: float = 0.6, loop_run: int = 8, max_garbage: float = 0.3
) -> dict:
    """Metrics of one generation and the reasons it is degenerate (empty list: fine)."""
    words = text.split()
    metrics = {
        "tokens": len(token_ids),
        "repeat_4gram_ratio": repeated_ngram_ratio(token_ids, 4),
        "distinct_1": distinct_n(words, 1),
        "distinct_2": distinct_n(words, 2),
        "longest_token_run": longest_run(token_ids),
        "longest_repeated_substring": longest_repeated_substring(text),
        "garbage_share": garbage_share(text),
    }
    reasons = []
    if not text.strip():
        reasons.append("empty output")
    if metrics["repeat_4gram_ratio"] > max_repeat_ratio:
        reasons.append(f"repeated 4-grams {metrics['repeat_4gram_ratio']:.2f} > {max_repeat_ratio}")
    if metrics["longest_token_run"] >= loop_run:
        reasons.append(f"one-token loop of {metrics['longest_token_run']}")
    if metrics["garbage_share"] > max_garbage:
        reasons.append(f"non-text characters {metrics['garbage_share']:.2f}")
    metrics["degenerate"] = reasons
    return metrics
