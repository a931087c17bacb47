"""Sentencepiece tokenizer and the vicuna_v1 prompt of LLaVA's evaluation scripts."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .config import read_regular
from .weights import WeightsError

MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.model: LLaMA's is 0.5 MB, Gemma's (256k pieces) 4 MB
IMAGE_PLACEHOLDER = "<image>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class PromptError(ValueError):
    """The prompt cannot be run (e.g. longer than the model's context, or not text)."""


def build_prompt(question: str) -> str:
    """The vicuna_v1 conversation with one image before the question, ready for the assistant's turn.

    The image slot is the first `<image>` of the result: the template puts it before the user's text,
    which may itself contain `<image>` and stays text (see `Tokenizer.encode_prompt`)."""
    return f"{SYSTEM} USER: {IMAGE_PLACEHOLDER}\n{question} ASSISTANT:"


class Tokenizer:
    def __init__(self, path: str | Path):
        """A sentencepiece model from `path`, read here (a regular file, bounded size) and parsed from
        memory, so a broken or hostile file is one WeightsError, never sentencepiece's exception."""
        data = read_regular(Path(path), MAX_TOKENIZER_BYTES, WeightsError)
        if not data:  # sentencepiece would accept it, log to stderr and tokenize to nothing
            raise WeightsError(f"{path}: empty tokenizer file")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError:
            raise WeightsError(f"{path}: not a sentencepiece model (truncated or another format)") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.n_pieces = self.sp.get_piece_size()
        if self.bos_id < 0 or self.eos_id < 0:  # every prompt starts with BOS, generation stops at EOS
            raise WeightsError(f"{path}: the tokenizer has no BOS or EOS piece, which LLaVA's prompts need")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; PromptError if it is not text (a lone surrogate, which sentencepiece,
        taking UTF-8, cannot take)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"the prompt has an unpaired surrogate \\u{ord(text[e.start]):04x} at character {e.start}, "
                              "which is not text; remove it") from None
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`. Ids with no piece (embedding rows past the tokenizer, e.g. the hub's
        padding to 32064) and control tokens decode to nothing."""
        return self.sp.decode([i for i in ids if 0 <= i < self.n_pieces and not self.sp.is_control(i)])

    def encode_prompt(self, prompt: str) -> list[list[int]]:
        """Token ids of the text before and after the image slot, the first `<image>` of a
        `build_prompt` prompt: [BOS + before, after] (one chunk, BOS + text, without a slot). Each chunk
        is encoded on its own (with sentencepiece's dummy prefix), as LLaVA's `tokenizer_image_token`.
        An `<image>` after the slot is the user's text and encoded as text: splitting there would
        make an image slot out of a question."""
        before, slot, after = prompt.partition(IMAGE_PLACEHOLDER)
        chunks = [[self.bos_id] + self.encode(before)]
        return chunks + [self.encode(after)] if slot else chunks


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
