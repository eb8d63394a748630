"""What the chat model is told when it writes an image prompt, and how its answer becomes one.

The words about a particular model come from that model's card
(`ModelCard.prompt_guide`, its plugin's); this module knows only what holds
for text-to-image prompts in general.
"""

from __future__ import annotations

import re

from imagine.assistant.ollama import Turn

# The longest prompt a generating route takes (request_bodies.Prompt).
MAX_PROMPT_CHARS = 2000
GENERAL_GUIDE = (
    "Name the subject first, then the setting, composition, medium or art style, lighting, colours and mood, "
    "in one paragraph of comma-separated phrases under 75 words."
)
ENHANCE_SYSTEM = (
    "You turn a short idea into one detailed prompt for the text-to-image model {model}. {guide} Keep the idea's "
    "subject and intent; add only concrete visual detail. Answer with the prompt alone: no title, no preamble, "
    "no quotation marks, no explanation."
)
# What models put before the prompt although told not to.
_LABEL = re.compile(r"^\s*(?:here(?:'s| is)[^:\n]*:|(?:enhanced |improved |detailed )?prompt\s*:)\s*", re.IGNORECASE)
_QUOTES = "\"'\u201c\u201d\u2018\u2019`"


def enhance_turns(idea: str, model: str, guide: str, style: str | None) -> list[Turn]:
    system = ENHANCE_SYSTEM.format(model=model, guide=guide or GENERAL_GUIDE)
    request = f"Idea: {idea}"
    if style:
        request += f"\nStyle: {style}"
    return [Turn("system", system), Turn("user", request)]


def clean_prompt(answer: str) -> str:
    """The model's answer as a prompt the generating routes take: label and quotes gone, one line, not too long."""
    text = _LABEL.sub("", answer.strip()).strip().strip(_QUOTES).strip()
    text = " ".join(text.split())
    if len(text) <= MAX_PROMPT_CHARS:
        return text
    cut = text[:MAX_PROMPT_CHARS]
    # At the last word boundary, so the prompt does not end in half a word.
    return cut.rsplit(" ", 1)[0] if " " in cut else cut
