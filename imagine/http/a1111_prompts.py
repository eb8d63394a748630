"""What A1111's prompt syntax (`models.prompt_syntax = "a1111"`) asks of a body before it is admitted.

- `<lora:name:weight>` tags leave the prompt and join the body's `loras` after
  the ones it sent, so they are checked exactly as that field is (names from
  the LoRA folder only, no repeats, models that take LoRAs only) and batch by
  the same key. A prompt with tags and no `loras` field uses the tags alone,
  not the model's default LoRAs: the tags are the caller's choice of LoRAs. A
  prompt that is nothing but tags is refused, as a blank one is.
- Attention weights, nested brackets multiplied (`((word))` is 1.21, a thousand
  of them overflow), stay finite and within `MAX_ATTENTION_WEIGHT` either way,
  in the prompt and the negative prompt: past that the text embeddings are
  infinite or NaN, and the image black.
- At most `MAX_WEAKENED_PARTS` parts of a prompt weighted below 1: each one
  costs its own pass through the text encoders (a part weakened is blended
  with the prompt encoded without it), so a prompt of hundreds of them would
  buy minutes of the device for the price of one image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from imagine.errors import field_error, validation_error
from imagine.http.request_bodies import GenerateBody, LoraSpec
from imagine.plugin.prompt_syntax import PromptSyntaxError, lora_tags, weighted_chunks

# The `loras` field's own bounds.
MAX_LORAS = GenerateBody.model_fields["loras"].metadata[0].max_length
MAX_WEIGHT = 2.0
MAX_ATTENTION_WEIGHT = 100.0
MAX_WEAKENED_PARTS = 16


def read_a1111_prompts(body: GenerateBody) -> GenerateBody:
    """`body` with its prompt's LoRA tags moved to `loras`; 400 naming the field for a tag it cannot take,
    a prompt left empty, or an attention weight out of range."""
    body = _with_prompt_loras(body)
    errors = [*_attention_errors("prompt", body.prompt), *_attention_errors("negative_prompt", body.negative_prompt)]
    if errors:
        raise validation_error(errors)
    return body


def _attention_errors(field: str, text: str) -> Iterator[dict[str, Any]]:
    if "(" not in text and "[" not in text:
        return  # no bracket, no weight but 1: most prompts are not parsed on the event loop at all
    chunks = weighted_chunks(text)
    if not all(math.isfinite(chunk.weight) and abs(chunk.weight) <= MAX_ATTENTION_WEIGHT for chunk in chunks):
        yield field_error(
            field,
            f"an attention weight, its brackets' factors multiplied, must be between -{MAX_ATTENTION_WEIGHT:g} "
            f"and {MAX_ATTENTION_WEIGHT:g}",
        )
    weakened = sum(1 for chunk in chunks if chunk.weight < 1 and chunk.text.strip())
    if weakened > MAX_WEAKENED_PARTS:
        yield field_error(
            field,
            f"at most {MAX_WEAKENED_PARTS} parts may be weighted below 1 (this prompt has {weakened}): "
            "each costs a pass through the text encoders",
        )


def _with_prompt_loras(body: GenerateBody) -> GenerateBody:
    """`body` with its prompt's LoRA tags moved to `loras`; 400 naming `prompt` for a tag it cannot take."""
    try:
        text, tags = lora_tags(body.prompt)
    except PromptSyntaxError as error:
        raise validation_error([field_error("prompt", str(error))]) from None
    if not tags:
        return body
    errors = [
        field_error("prompt", f"<lora:{tag.name}:{tag.weight:g}>: the weight must be between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
        for tag in tags
        if abs(tag.weight) > MAX_WEIGHT
    ]
    errors.extend(field_error("prompt", "a <lora:...> name is at most 200 characters") for tag in tags if len(tag.name) > 200)
    if errors:
        raise validation_error(errors)
    loras = [*body.loras, *(LoraSpec(name=tag.name, weight=tag.weight) for tag in tags)]
    if len(loras) > MAX_LORAS:
        errors.append(field_error("prompt", f"at most {MAX_LORAS} LoRAs, tags and the loras field together"))
    if not text.strip():
        errors.append(field_error("prompt", "must not be blank once its <lora:...> tags are taken out"))
    if errors:
        raise validation_error(errors)
    return body.model_copy(update={"prompt": text.strip(), "loras": loras})
