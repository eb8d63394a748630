"""A1111's prompt grammar as text: weights, escapes and LoRA tags."""

from __future__ import annotations

import pytest

from imagine.plugin.prompt_syntax import Chunk, PromptSyntaxError, LoraTag, is_weighted, lora_tags, plain_text, weighted_chunks


@pytest.mark.parametrize(
    ("prompt", "chunks"),
    [
        ("a cat on a sofa", [Chunk("a cat on a sofa", 1.0)]),
        ("a (cat:1.3) dog", [Chunk("a ", 1.0), Chunk("cat", 1.3), Chunk(" dog", 1.0)]),
        ("a (cat) dog", [Chunk("a ", 1.0), Chunk("cat", 1.1), Chunk(" dog", 1.0)]),
        ("a [cat] dog", [Chunk("a ", 1.0), Chunk("cat", 1 / 1.1), Chunk(" dog", 1.0)]),
        ("((cat)) dog", [Chunk("cat", 1.1 * 1.1), Chunk(" dog", 1.0)]),
        ("(a (cat:2) b:0.5)", [Chunk("a ", 0.5), Chunk("cat", 1.0), Chunk(" b", 0.5)]),
        (r"a \(cat\) \[dog\] \\", [Chunk(r"a (cat) [dog] \ ".rstrip(), 1.0)]),
        ("(unclosed", [Chunk("unclosed", 1.1)]),
        ("ratio 16:9, (x:1.2.3)", [Chunk("ratio 16:9, ", 1.0), Chunk("x:1.2.3", 1.1)]),
    ],
)
def test_weighted_chunks_follow_a1111(prompt: str, chunks: list[Chunk]) -> None:
    parsed = weighted_chunks(prompt)
    assert [chunk.text for chunk in parsed] == [chunk.text for chunk in chunks]
    assert [chunk.weight for chunk in parsed] == pytest.approx([chunk.weight for chunk in chunks])


def test_weight_one_is_plain_text() -> None:
    assert not is_weighted(weighted_chunks("a (cat:1.0) on a sofa"))
    assert plain_text(weighted_chunks(r"a (cat:1.0) on a \(red\) sofa")) == "a cat on a (red) sofa"
    assert is_weighted(weighted_chunks("a (cat) on a sofa"))


def test_lora_tags_leave_the_prompt() -> None:
    assert lora_tags("a cat <lora:pixel-art:0.8> in <lora:watercolor>") == (
        "a cat  in ",
        [LoraTag("pixel-art", 0.8), LoraTag("watercolor", 1.0)],
    )
    assert lora_tags("a cat") == ("a cat", [])
    for bad in ("<hypernet:x:1>", "<lora:x:strong>", "<lora:x:0.5:0.5>", "<lora: :1>", "<lora:x:inf>"):
        with pytest.raises(PromptSyntaxError):
            lora_tags(f"a cat {bad}")
