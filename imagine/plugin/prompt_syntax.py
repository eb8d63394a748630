"""AUTOMATIC1111's prompt syntax, as text: attention weights and `<lora:name:weight>` tags.

`weighted_chunks` splits a prompt into (text, weight) chunks the way A1111's
`parse_prompt_attention` does: `(word)` multiplies by 1.1, `[word]` divides by
1.1, `(word:1.3)` sets a factor, brackets nest and multiply, `\\(` `\\)` `\\[`
`\\]` `\\\\` are literal, and an unclosed bracket runs to the end. No package
outside the web UI itself offers this grammar, so it is kept here, small and
text-only: the core reads LoRA tags with it, and generator plugins turn the
chunks into weighted embeddings on the device thread.

`models.prompt_syntax = "plain"` turns it off: prompts are read literally.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SYNTAXES = ("a1111", "plain")
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1

# A1111's tokens: escapes, brackets, an explicit weight closing a round bracket, text, a stray colon.
_ATTENTION = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\ |
    \( | \[ |
    :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\) |
    \) | \] |
    [^\\()\[\]:]+ |
    :
    """,
    re.VERBOSE,
)
# A1111's extra-network tags: <kind:arguments>, e.g. <lora:name:0.8>.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class Chunk:
    text: str
    weight: float


def weighted_chunks(prompt: str) -> list[Chunk]:
    """The prompt as consecutive chunks of equal weight; their texts joined are the prompt without the syntax."""
    tokens = list(_ATTENTION.finditer(prompt))
    texts: list[str] = []
    # A closing bracket multiplies every chunk since its opening one, as A1111 does: in numpy, the same
    # multiplications in the same order, without a Python loop per chunk (a prompt of a thousand
    # brackets would take tens of milliseconds on the event loop otherwise).
    weights = np.ones(len(tokens))
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        # A weight may overflow to inf (refused by the core as out of range): no warning on the way.
        with np.errstate(over="ignore", invalid="ignore"):
            weights[start : len(texts)] *= factor

    for match in tokens:
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            texts.append(token[1:] or "\\")
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_FACTOR)
        else:
            texts.append(token)
    for start in round_open:
        multiply(start, ROUND_FACTOR)
    for start in square_open:
        multiply(start, SQUARE_FACTOR)

    return joined(Chunk(text, weight) for text, weight in zip(texts, weights.tolist())) or [Chunk("", 1.0)]


def joined(chunks: Iterable[Chunk]) -> list[Chunk]:
    """Consecutive chunks of equal weight as one."""
    merged: list[Chunk] = []
    for chunk in chunks:
        if merged and merged[-1].weight == chunk.weight:
            merged[-1] = Chunk(merged[-1].text + chunk.text, chunk.weight)
        else:
            merged.append(chunk)
    return merged


def is_weighted(chunks: list[Chunk]) -> bool:
    """Whether any chunk has a weight other than 1: only then do embeddings differ from the plain text's."""
    return any(chunk.weight != 1.0 for chunk in chunks)


def plain_text(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


class PromptSyntaxError(ValueError):
    """A tag the prompt cannot carry; the message says which and why."""


@dataclass(frozen=True)
class LoraTag:
    name: str
    weight: float


def lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its `<lora:name[:weight]>` tags, and the tags in order.

    Other extra-network kinds (hypernetworks, embeddings by tag) are refused:
    silently dropping one would change the image without a word.
    """
    tags: list[LoraTag] = []

    def take(match: re.Match[str]) -> str:
        kind, arguments = match.group(1), match.group(2).split(":")
        if kind.lower() != "lora":
            raise PromptSyntaxError(f"<{kind}:...> tags are not supported; only <lora:name:weight>")
        name = arguments[0].strip()
        if not name:
            raise PromptSyntaxError("a <lora:...> tag needs a LoRA name")
        if len(arguments) > 2:
            raise PromptSyntaxError(f"<lora:{name}:...> takes one weight (separate text encoder weights are not supported)")
        weight = 1.0
        if len(arguments) == 2:
            try:
                weight = float(arguments[1])
            except ValueError:
                raise PromptSyntaxError(f"<lora:{name}:{arguments[1]}>: the weight must be a number") from None
            if not math.isfinite(weight):
                raise PromptSyntaxError(f"<lora:{name}:{arguments[1]}>: the weight must be a finite number")
        tags.append(LoraTag(name, weight))
        return ""

    text = _EXTRA_NETWORK.sub(take, prompt)
    return (text, tags) if tags else (prompt, tags)
