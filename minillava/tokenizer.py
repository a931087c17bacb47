"""Sentencepiece tokenizer and the vicuna_v1 prompt of LLaVA's evaluation scripts."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

IMAGE_PLACEHOLDER = "<image>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def build_prompt(question: str) -> str:
    """The vicuna_v1 conversation with one image before the question, ready for the assistant's turn."""
    return f"{SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


class Tokenizer:
    def __init__(self, path: str | Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.n_pieces = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`. Ids with no piece (embedding rows past the tokenizer, e.g. the hub's
        padding to 32064) and control tokens decode to nothing."""
        return self.sp.decode([i for i in ids if 0 <= i < self.n_pieces and not self.sp.is_control(i)])

    def encode_prompt(self, prompt: str) -> list[list[int]]:
        """Token ids of the text around each `<image>`: BOS + chunk 0, chunk 1, ... Each chunk is
        encoded on its own (with sentencepiece's dummy prefix), as LLaVA's `tokenizer_image_token`."""
        chunks = [self.encode(c) for c in prompt.split(IMAGE_PLACEHOLDER)]
        chunks[0] = [self.bos_id] + chunks[0]
        return chunks


class StreamDecoder:
    """Turns a growing list of ids into newly printable text, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character still arriving byte by byte
            return ""
        new, self.printed = text[len(self.printed) :], text
        return new
