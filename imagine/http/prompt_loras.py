"""`<lora:name:weight>` tags in a prompt become the request's LoRAs (with `models.prompt_syntax = "a1111"`).

The tags leave the prompt and join the body's `loras` after the ones it sent,
so they are checked exactly as that field is (names from the LoRA folder only,
no repeats, models that take LoRAs only) and batch by the same key. A prompt
with tags and no `loras` field uses the tags alone, not the model's default
LoRAs: the tags are the caller's choice of LoRAs.
"""

from __future__ import annotations

from imagine.errors import field_error, validation_error
from imagine.http.request_bodies import GenerateBody, LoraSpec
from imagine.plugin.prompt_syntax import PromptSyntaxError, lora_tags

# The `loras` field's own bounds.
MAX_LORAS = GenerateBody.model_fields["loras"].metadata[0].max_length
MAX_WEIGHT = 2.0


def with_prompt_loras(body: GenerateBody) -> GenerateBody:
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
    if errors:
        raise validation_error(errors)
    return body.model_copy(update={"prompt": text.strip(), "loras": loras})
