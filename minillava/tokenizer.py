"""Sentencepiece tokenizer with the checkpoint's added tokens, and the prompt of its conversation template;
and Qwen2's byte-level BPE (tokenizer.json, LLaVA-OneVision) behind the same interface (`ByteBPETokenizer`).

Added tokens (tokenizer_config.json's `added_tokens_decoder`, added_tokens.json) are tokens the
tokenizer files name outside the sentencepiece model, such as ChatML's `<|im_start|>` / `<|im_end|>` of
LLaVA-1.6-34B. Only a template's own tokens are ever encoded as added tokens, and only where the template
writes them: the user's question is text, so a question holding "<|im_start|>" or "<image>" is encoded
as those characters, never as a turn marker or an image slot (transformers' tokenizer would split it on
every added token). For every question without such strings the ids are those of LLaVA's
`tokenizer_image_token`.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from .conversation import DEFAULT_TEMPLATE, EOS, IMAGE_PLACEHOLDER, Template
from .trust import WeightsError, parse_json, read_regular, show
from .validate import BOUNDS

MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.model: LLaMA's is 0.5 MB, Gemma's (256k pieces) 4 MB
MAX_TOKENIZER_JSON_BYTES = 16 << 20  # added_tokens.json, tokenizer_config.json: a few KB
SYSTEM = DEFAULT_TEMPLATE.before.removesuffix(" USER: ")  # llava_v1's system text


class PromptError(ValueError):
    """The prompt cannot be run (e.g. longer than the model's context, or not text)."""


def build_prompt(question: str, template: Template = DEFAULT_TEMPLATE) -> str:
    """The conversation with one image before the question, ready for the assistant's turn.

    The image slot is the first `<image>` of the result: the template puts it before the user's text,
    which may itself contain `<image>` and stays text (see `Tokenizer.encode_prompt`)."""
    return template.render(question)


def read_added_tokens(model_dir: Path) -> tuple[dict[str, int], set[int], bool]:
    """From a checkpoint's tokenizer files: added tokens {text: id}, the ids of the special ones (decoded
    to nothing, as LLaVA's `batch_decode(..., skip_special_tokens=True)`), and whether the tokenizer puts
    BOS first (`add_bos_token`, LlamaTokenizer's default True). Absent files: none, none, True.
    Checked only for shape here; an id is checked against the embedding table when a template uses it."""
    added, special, add_bos = {}, set(), True

    def take(text, i, where, is_special):
        if type(text) is not str or not text or type(i) is not int or not 0 <= i < BOUNDS["vocab_size"][1]:
            raise WeightsError(f"{where}: added token {show(text)} -> {show(i)} is not a token text and an id")
        if text not in added:  # tokenizer_config.json first, as transformers reads it
            added[text] = i
            if is_special:
                special.add(i)

    path = model_dir / "tokenizer_config.json"
    if path.exists():
        raw = parse_json(read_regular(path, MAX_TOKENIZER_JSON_BYTES, WeightsError), str(path), WeightsError)
        decoder = raw.get("added_tokens_decoder", {}) if isinstance(raw, dict) else None
        if not isinstance(decoder, dict):
            raise WeightsError(f"{path}: added_tokens_decoder must be a JSON object of id -> token")
        for key, token in decoder.items():
            if not (isinstance(token, dict) and key.isdigit() and len(key) <= 7):
                raise WeightsError(f"{path}: added_tokens_decoder entry {show(key)} is not an id -> token object")
            take(token.get("content"), int(key), path, token.get("special") is True)
        add_bos = raw.get("add_bos_token", True)
        if type(add_bos) is not bool:
            raise WeightsError(f"{path}: add_bos_token must be true or false, got {show(add_bos)}")
    # Older saves list added tokens here only. liuhaotian/llava-v1.6-34b-tokenizer's also lists
    # <|startoftext|> at 64000, past the 64,000 embeddings, where tokenizer_config.json says 1: the first
    # file wins, and an id is checked against the embedding table only where a template uses it.
    path = model_dir / "added_tokens.json"
    if path.exists():
        raw = parse_json(read_regular(path, MAX_TOKENIZER_JSON_BYTES, WeightsError), str(path), WeightsError)
        if not isinstance(raw, dict):
            raise WeightsError(f"{path}: must be a JSON object of token text -> id")
        for text, i in raw.items():
            take(text, i, path, False)
    return added, special, add_bos


class Tokenizer:
    def __init__(self, path: str | Path, added: dict[str, int] | None = None, special: set[int] = frozenset(),
                 add_bos: bool = True):
        """A sentencepiece model from `path`, read here (a regular file, bounded size) and parsed from
        memory, so a broken or hostile file is one WeightsError, never sentencepiece's exception.
        `added`, `special`, `add_bos`: see `read_added_tokens`. The template is llava_v1 until
        `use_template` is called."""
        data = read_regular(Path(path), MAX_TOKENIZER_BYTES, WeightsError)
        if not data:  # sentencepiece would accept it, log to stderr and tokenize to nothing
            raise WeightsError(f"{path}: empty tokenizer file")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, ValueError):  # ValueError: UnicodeDecodeError of a message quoting the broken bytes
            raise WeightsError(f"{path}: not a sentencepiece model (truncated or another format)") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.end_id = self.eos_id  # the tokenizer's own EOS, what a template stopping on EOS stops on
        self.n_pieces = self.sp.get_piece_size()
        if self.bos_id < 0 or self.eos_id < 0:  # every prompt starts with BOS, generation stops at EOS
            raise WeightsError(f"{path}: the tokenizer has no BOS or EOS piece, which LLaVA's prompts need")
        self.added, self.special, self.add_bos = dict(added or {}), set(special), add_bos
        self.names = {i: t for t, i in self.added.items()}  # id -> text of added tokens, for decoding
        self.template = DEFAULT_TEMPLATE

    def token_id(self, text: str) -> int | None:
        """The id of one token written `text`: an added token, or else a piece of the sentencepiece model
        (Yi's tokenizer.model has <|im_start|> and <|im_end|> as pieces); None if it is neither."""
        if text in self.added:
            return self.added[text]
        i = self.sp.piece_to_id(text)
        return i if i != self.sp.unk_id() or text == self.sp.id_to_piece(self.sp.unk_id()) else None

    def use_template(self, template: Template, vocab_size: int):
        """Encode prompts with `template`, and stop generation where its assistant's turn ends: `eos_id`
        becomes its stop token's id (chatml_direct: <|im_end|>, as LLaVA's 34B stops on conv.sep).
        WeightsError if the tokenizer lacks one of its tokens or one lies past the embedding table."""
        for text in (*template.special, template.stop):
            i = self.eos_id if text == EOS else self.token_id(text)
            if i is None:
                raise WeightsError(f"the {template.name} template needs the token {text}, which this tokenizer has "
                                   "neither as an added token (added_tokens.json, tokenizer_config.json) nor as a piece")
            if i >= vocab_size:
                raise WeightsError(f"the tokenizer gives {text} the id {i}, past the model's {vocab_size} embeddings")
        self.template = template
        self.eos_id = self.end_id if template.stop == EOS else self.token_id(template.stop)

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
        padding to 32064), control pieces, the stop token and special added tokens decode to nothing; other
        added tokens to their text."""
        out, run = [], []
        for i in ids:
            if i == self.eos_id:  # the stop token (chatml_direct: <|im_end|>, which may be a plain piece)
                continue
            if i in self.names:
                out.append(self.sp.decode(run))
                run = []
                if i not in self.special:
                    out.append(self.names[i])
            elif 0 <= i < self.n_pieces and not self.sp.is_control(i):
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def _encode_parts(self, parts: list[tuple[str, bool]]) -> list[int]:
        """Ids of consecutive text parts, (text, is_template): a template part is split on the template's
        added tokens, and the text between added tokens (template and user text together, as one string)
        is encoded by sentencepiece in one call, as transformers' tokenizer does between added tokens."""
        ids, text = [], ""
        for part, is_template in parts:
            if not is_template:
                text += part
                continue
            while part:
                at = {t: part.find(t) for t in self.template.special if t in part}
                if not at:
                    text += part
                    break
                first = min(at, key=at.get)
                text += part[: at[first]]
                if text:
                    ids += self.encode(text)
                ids.append(self.token_id(first))
                text, part = "", part[at[first] + len(first) :]
        return ids + (self.encode(text) if text else [])

    def encode_question(self, question: str) -> list[list[int]]:
        """Token ids of the template's prompt for `question` around the image slot: [BOS + before,
        after], as `encode_prompt(build_prompt(question, template))` but with the template's added tokens
        as their ids (and the question always as text). BOS only if the tokenizer adds one (Yi's does
        not), as LLaVA's `tokenizer_image_token` keeps it only then."""
        t = self.template
        before = self._encode_parts([(t.before, True)])
        after = self._encode_parts([(t.close, True), ("\n" + question, False), (t.after, True)])
        for text in t.special:  # a tokenizer whose pieces include them (user-defined pieces) matches them in text
            if after.count(self.token_id(text)) > (t.close + t.after).count(text):
                raise PromptError(f"the question contains {text}, which this tokenizer always reads as the "
                                  "template's turn marker; remove it")
        return [[self.bos_id] * self.add_bos + before, after]

    def encode_prompt(self, prompt: str) -> list[list[int]]:
        """Token ids of the text before and after the image slot, the first `<image>` of a
        `build_prompt` prompt: [BOS + before, after] (one chunk, BOS + text, without a slot). Each chunk
        is encoded on its own (with sentencepiece's dummy prefix), as LLaVA's `tokenizer_image_token`.
        An `<image>` after the slot is the user's text and encoded as text: splitting there would
        make an image slot out of a question."""
        before, slot, after = prompt.partition(IMAGE_PLACEHOLDER)
        chunks = [[self.bos_id] + self.encode(before)]
        return chunks + [self.encode(after)] if slot else chunks


class ByteBPETokenizer(Tokenizer):
    """Qwen2's tokenizer (LLaVA-OneVision): byte-level BPE read from tokenizer.json by the `tokenizers`
    library, its added tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...) from the same file. No BOS
    (Qwen2's tokenizer adds none). As for sentencepiece, text is encoded by a copy without the added
    tokens, so a question holding "<|im_start|>" stays text; only the template writes turn markers."""

    def __init__(self, path: str | Path, added: dict[str, int] | None = None, special: set[int] = frozenset(),
                 add_bos: bool = False):
        """tokenizer.json from `path` (a regular file, bounded size), parsed from memory: a broken file
        is one WeightsError. `added`, `special`: more added tokens (tokenizer_config.json's), as for
        sentencepiece; the file's own come first. `add_bos` is ignored: Qwen2 puts no BOS first."""
        from tokenizers import Tokenizer as HFTokenizer

        data = read_regular(Path(path), MAX_TOKENIZER_BYTES, WeightsError)
        try:
            raw = parse_json(data, str(path), WeightsError)
            if not isinstance(raw, dict) or not isinstance(raw.get("added_tokens", []), list):
                raise WeightsError(f"{path}: not a tokenizer.json (a JSON object with a model)")
            self.full = HFTokenizer.from_str(data.decode("utf-8"))
            # the same tokenizer without its added tokens: what user text is encoded with
            self.text_only = HFTokenizer.from_str(json.dumps({**raw, "added_tokens": []}))
        except WeightsError:
            raise
        except Exception as e:  # the library raises plain Exceptions on a file it cannot read
            raise WeightsError(f"{path}: not a tokenizer.json the tokenizers library can read ({type(e).__name__})") from None
        file_added = {t["content"]: t["id"] for t in raw.get("added_tokens", [])
                      if isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int}
        self.added = {**dict(added or {}), **file_added}
        self.special = set(special) | {t["id"] for t in raw.get("added_tokens", [])
                                       if isinstance(t, dict) and t.get("special") is True and type(t.get("id")) is int}
        self.names = {i: t for t, i in self.added.items()}
        self.n_pieces = self.full.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.add_bos = None, False
        self.eos_id = self.end_id = self.token_id("<|endoftext|>")  # Qwen2's end of text
        self.template = DEFAULT_TEMPLATE

    def token_id(self, text: str) -> int | None:
        """The id of one token written `text`: an added token, or a piece of the BPE vocabulary."""
        if text in self.added:
            return self.added[text]
        return self.full.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as text (no added token matched); PromptError if it is not text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"the prompt has an unpaired surrogate \\u{ord(text[e.start]):04x} at character {e.start}, "
                              "which is not text; remove it") from None
        return self.text_only.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`: the stop token, special added tokens and ids past the vocabulary (embedding rows
        the tokenizer does not have) decode to nothing, other added tokens to their text."""
        out, run = [], []
        for i in ids:
            if i == self.eos_id or not 0 <= i < self.n_pieces:
                continue
            if i in self.names:
                out.append(self.text_only.decode(run, skip_special_tokens=False))
                run = []
                if i not in self.special:
                    out.append(self.names[i])
            else:
                run.append(i)
        return "".join(out) + self.text_only.decode(run, skip_special_tokens=False)

    def encode_prompt(self, prompt: str) -> list[list[int]]:
        raise NotImplementedError("use encode_question: it writes the template's added tokens as their ids")


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The checkpoint's tokenizer: tokenizer.model (sentencepiece: LLaVA-NeXT's Vicuna, Mistral, Yi), else
    tokenizer.json (byte-level BPE: OneVision's Qwen2), with its added tokens."""
    sp = model_dir / "tokenizer.model"
    if sp.exists() or sp.is_symlink():
        return Tokenizer(sp, *read_added_tokens(model_dir))
    bpe = model_dir / "tokenizer.json"
    if bpe.exists() or bpe.is_symlink():
        added, special, _ = read_added_tokens(model_dir)
        return ByteBPETokenizer(bpe, added, special)
    raise WeightsError(f"{model_dir}: no tokenizer.model (sentencepiece) or tokenizer.json (byte-level BPE, Qwen2)")


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
