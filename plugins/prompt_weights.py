"""Weighted prompts: A1111's `(word:1.3)` chunks as text embeddings, through compel, on the device thread.

A batch whose prompts carry no weight other than 1 is handed to the pipeline
as text, exactly as before (escapes and brackets of weight 1 removed). When one
does, every prompt and negative prompt of the batch becomes embeddings: the
weighted ones through compel (SDXL's two text encoders, with the second's
pooled embedding), the others through the pipeline's own `encode_prompt`, so an
unweighted prompt is encoded the same whichever batch it lands in. Prompts are
cut at the encoders' 77 tokens as the pipelines' own encoding does, so every
embedding of a batch has one shape and no prompt is padded for another's sake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagine.plugin.prompt_syntax import Chunk, is_weighted, joined, plain_text, weighted_chunks


def prompt_arguments(pipeline: Any, prompts: Sequence[str], negatives: Sequence[str], syntax: str) -> dict[str, Any]:
    """The pipeline call's prompt arguments for one image per entry (call under torch.inference_mode)."""
    if syntax == "plain":
        return _texts(list(prompts), list(negatives))
    positive = [_tokened_chunks(prompt) for prompt in prompts]
    negative = [_tokened_chunks(text) for text in negatives]
    if not any(is_weighted(chunks) for chunks in (*positive, *negative)):
        return _texts([plain_text(chunks) for chunks in positive], [plain_text(chunks) for chunks in negative])
    encoder = _Encoder(pipeline)
    arguments = encoder.batch("prompt_embeds", "pooled_prompt_embeds", positive)
    # No negatives: the pipeline builds its own "empty" ones (SDXL's zeros), as it does for text.
    if any(negatives):
        arguments |= encoder.batch("negative_prompt_embeds", "negative_pooled_prompt_embeds", negative)
    return arguments


def _tokened_chunks(text: str) -> list[Chunk]:
    """The prompt's chunks, where whitespace alone carries no weight (`a [ ] cat`): it has no token to weigh,
    and compel fails on a weighted fragment without one."""
    return joined(Chunk(chunk.text, chunk.weight if chunk.text.strip() else 1.0) for chunk in weighted_chunks(text))


def _texts(prompts: list[str], negatives: list[str]) -> dict[str, Any]:
    # None lets SDXL use its zeroed "empty" negative embedding, as it was trained.
    return {"prompt": prompts, "negative_prompt": negatives if any(negatives) else None}


class _Encoder:
    """Embeddings for one pipeline's text encoders: one (hidden states, pooled) pair per text."""

    def __init__(self, pipeline: Any) -> None:
        from compel import Compel, ReturnedEmbeddingsType

        self.pipeline = pipeline
        self.two_encoders = getattr(pipeline, "text_encoder_2", None) is not None
        if self.two_encoders:
            # SDXL conditions on both encoders' penultimate hidden states, side by side, and the second's pooled output.
            penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            self.compels = [
                Compel(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, returned_embeddings_type=penultimate),
                Compel(
                    tokenizer=pipeline.tokenizer_2,
                    text_encoder=pipeline.text_encoder_2,
                    returned_embeddings_type=penultimate,
                    requires_pooled=True,
                ),
            ]
        else:
            self.compels = [Compel(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder)]

    def batch(self, embeds_name: str, pooled_name: str, texts: Sequence[list[Chunk]]) -> dict[str, Any]:
        import torch

        encoded = [self.encode(chunks) for chunks in texts]
        arguments = {embeds_name: torch.cat([embeds for embeds, _ in encoded])}
        if self.two_encoders:
            arguments[pooled_name] = torch.cat([pooled for _, pooled in encoded])
        return arguments

    def encode(self, chunks: list[Chunk]) -> tuple[Any, Any]:
        device = self.pipeline.text_encoder.device
        if not is_weighted(chunks):
            encoded = self.pipeline.encode_prompt(
                prompt=plain_text(chunks), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            # SDXL answers (embeds, negative, pooled, negative pooled); SD 1.5 (embeds, negative).
            return encoded[0], encoded[2] if self.two_encoders else None
        import torch
        from compel.prompt_parser import FlattenedPrompt, Fragment

        prompt = FlattenedPrompt([Fragment(chunk.text, chunk.weight) for chunk in chunks])
        hidden = [compel.build_conditioning_tensor_for_prompt_object(prompt)[0][0] for compel in self.compels]
        dtype = self.pipeline.text_encoder.dtype
        # SDXL's two encoders side by side, along the feature dimension.
        embeds = (hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)).to(device=device, dtype=dtype)
        if not self.two_encoders:
            return embeds, None
        # A pooled embedding summarises the whole text: compel takes it from the text without weights.
        pooled = self.compels[1].conditioning_provider.get_pooled_embeddings([plain_text(chunks)], device=device)
        return embeds, pooled.to(dtype=self.pipeline.text_encoder_2.dtype)

