"""LLaVA-1.6's conversation templates as data, and which one a checkpoint was trained with.

Every template is one user turn holding the image and the question, then the opening of the assistant's
turn: `before + "<image>\\n" + question + after`. The strings are what LLaVA's `Conversation.get_prompt`
(llava/conversation.py, haotian-liu/LLaVA c121f04) returns for the conversation
`[(roles[0], "<image>\\n" + question), (roles[1], None)]`, as its evaluation scripts build it
(llava/eval/model_vqa_loader.py: `qs = DEFAULT_IMAGE_TOKEN + '\\n' + qs`):

- SeparatorStyle.TWO (llava_v1, vicuna_v1): `system + sep + role0 + ": " + message + sep + role1 + ":"`, sep " ".
- SeparatorStyle.LLAMA_2 (mistral_instruct, system ""): `"[INST] " + message + " [/INST]"`; the empty system
  adds no <<SYS>> block and the empty sep nothing.
- SeparatorStyle.MPT (chatml_direct): `system + sep + role0 + message + sep + role1`, sep "<|im_end|>".
- SeparatorStyle.CHATML (qwen_1_5, LLaVA-OneVision's, from LLaVA-VL/LLaVA-NeXT's llava/conversation.py
  `conv_qwen`): `system + sep + "\n" + role0 + "\n" + message + sep + "\n" + role1 + "\n"`, sep "<|im_end|>".

`stop` is the text that ends the assistant's turn, where LLaVA stops (llava/serve/cli.py: `stop_str =
conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2`; conv.sep2 is "</s>" for LLAMA_2 too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .trust import ConfigError, parse_json, read_regular, show

IMAGE_PLACEHOLDER = "<image>"
EOS = "</s>"  # LLaMA's and Mistral's end of sequence: the tokenizer's own EOS piece
MAX_TEMPLATE_BYTES = 16 << 20  # chat templates, tokenizer_config.json (as tokenizer.MAX_TOKENIZER_JSON_BYTES)


@dataclass(frozen=True)
class Template:
    name: str
    before: str  # template text before the image slot
    after: str  # template text after the question: the end of the user's turn, the assistant's opening
    stop: str  # the assistant's turn ends here: EOS, or an added token
    special: tuple[str, ...] = ()  # added tokens in `before` / `close` / `after`, encoded as their own ids
    close: str = ""  # template text right after the image (InternVL's </img>; its <img> ends `before`)

    def render(self, question: str) -> str:
        """The whole prompt as text (the image slot is its first `<image>`)."""
        return f"{self.before}{IMAGE_PLACEHOLDER}{self.close}\n{question}{self.after}"


HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# internvl2_5's system message (its English: "You are InternVL, a multimodal large language model developed
# jointly by Shanghai AI Laboratory, Tsinghua University and several partner institutions.")
INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"

TEMPLATES = {
    t.name: t
    for t in [
        # conv_llava_v1: what run_llava.py picks for a "v1" model name, and the prompt llava-hf documents
        # for llava-v1.6-vicuna-7b-hf / -13b-hf. The default for Vicuna checkpoints.
        Template("llava_v1", HUMAN_SYSTEM + " USER: ", " ASSISTANT:", EOS),
        # conv_vicuna_v1: what LLaVA's evaluation scripts pass (scripts/v1_5/eval/*.sh: --conv-mode
        # vicuna_v1). The same but for "user" instead of "human" in the system text.
        Template("vicuna_v1", USER_SYSTEM + " USER: ", " ASSISTANT:", EOS),
        # conv_mistral_instruct (LLAMA_2 style, system "", sep "", sep2 "</s>")
        Template("mistral_instruct", "[INST] ", " [/INST]", EOS),
        # conv_chatml_direct (MPT style, system "<|im_start|>system\nAnswer the questions.",
        # roles "<|im_start|>user\n" / "<|im_start|>assistant\n", sep "<|im_end|>")
        Template("chatml_direct", "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n",
                 "<|im_end|><|im_start|>assistant\n", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
        # conv_qwen of LLaVA-VL/LLaVA-NeXT (conv_templates "qwen_1_5", what its OneVision examples pass:
        # CHATML style, system "<|im_start|>system\nYou are a helpful assistant.", roles "<|im_start|>user" /
        # "<|im_start|>assistant", sep "<|im_end|>"). LLaVA-OneVision's template, for Qwen2 decoders.
        Template("qwen_1_5", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                 "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
        # InternVL's internvl2_5 (OpenGVLab/InternVL internvl_chat/internvl/conversation.py: MPT style, system
        # template "<|im_start|>system\n{system_message}", roles "<|im_start|>user\n" / "<|im_start|>assistant\n",
        # sep "<|im_end|>\n"), as its `chat` fills it: "<image>\n" + question, the <image> replaced by
        # <img>, one <IMG_CONTEXT> per visual token (here: the image's embeddings), </img>. InternVL2.5/3's.
        Template("internvl2_5", f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n<|im_start|>user\n<img>",
                 "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<img>", "</img>"),
                 close="</img>"),
    ]
}
DEFAULT_TEMPLATE = TEMPLATES["llava_v1"]
FLAG = "--conv-template"


# --- which template a checkpoint uses --------------------------------------------------------------


def chat_template_text(model_dir: Path) -> str | None:
    """The checkpoint's chat template (Jinja source, never rendered here), from chat_template.jinja,
    chat_template.json or tokenizer_config.json's `chat_template` (a string, or a list of named
    templates: all of them), as transformers looks for it; None if it has none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return read_regular(jinja, MAX_TEMPLATE_BYTES).decode("utf-8", errors="replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.exists():
            raw = parse_json(read_regular(path, MAX_TEMPLATE_BYTES), str(path))
            value = raw.get("chat_template") if isinstance(raw, dict) else None
            if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
                value = "".join(t["template"] for t in value if isinstance(t, dict) and isinstance(t.get("template"), str))
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{path}: chat_template must be a string, got {show(value)}")
            if value:
                return value
    return None


def template_from_chat_template(text: str) -> str | None:
    """The template a llava-hf chat template renders, recognised by its markers; None if it is none of
    ours or looks like more than one."""
    if "<IMG_CONTEXT>" in text or "<img>" in text:  # InternVL's image markers: ChatML turns, its own template
        return "internvl2_5"
    found = set()
    if "<|im_start|>" in text:
        found.add("chatml_direct")
    if "[INST]" in text:
        found.add("mistral_instruct")
    if "ASSISTANT:" in text and not found:
        # llava-hf's Vicuna template writes the user's role as message['role'].upper() + ': ' and the
        # assistant's opening literally; its documented prompt is llava_v1's ("curious human"). A template
        # that spells out vicuna_v1's system text is taken as that.
        found.add("vicuna_v1" if "curious user" in text else "llava_v1")
    return found.pop() if len(found) == 1 else None


def template_from_name(model_dir: Path) -> str | None:
    """run_llava.py's rule (llava/eval/run_llava.py, eval_model) on the checkpoint's name, for the original
    layout, which carries no chat template. Only names it maps to a template we have count: its
    fallbacks (llava_v0, mpt, llava_llama_2) are LLaVA-1.5-era conversations, not LLaVA-1.6's."""
    # get_model_name_from_path: the last path component, or parent + "_" + it for checkpoint-N folders
    name = model_dir.name if not model_dir.name.startswith("checkpoint-") else f"{model_dir.parent.name}_{model_dir.name}"
    name = name.lower()
    if "llama-2" in name:
        return None
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    return None


def template_from_decoder(model_type: str, vocab_size: int, has_chatml: bool) -> str | None:
    """What LLaVA-1.6 trained each decoder with: Mistral-7B-Instruct -> mistral_instruct; Yi-34B (LLaMA
    layers, 64,000 pieces, ChatML tokens in its tokenizer) -> chatml_direct; Vicuna (LLaMA, LLaMA's
    32,000 pieces, padded to 32064 by llava-hf) -> llava_v1; and LLaVA-OneVision's Qwen2 -> qwen_1_5.
    None where the evidence does not say."""
    if model_type == "mistral":
        return "mistral_instruct"
    if model_type == "qwen2":
        return "qwen_1_5"
    if has_chatml:
        return "chatml_direct"
    if vocab_size < 64000:
        return "llava_v1"
    return None  # a 64,000-piece (Yi) vocabulary without ChatML tokens: not a checkpoint we know


def choose_template(model_dir: Path, layout: str, model_type: str, vocab_size: int, has_chatml: bool,
                    override: str | None = None, family: str = "llava-next") -> Template:
    """The checkpoint's template; `override` (--conv-template) wins. Evidence: the chat template's
    markers (llava-hf), run_llava.py's name rule (original layout) and the decoder (always; an InternVL
    model's is internvl2_5, whatever its decoder); any two that disagree, or none at all, refuse the
    checkpoint with an error naming the flag."""
    names = ", ".join(TEMPLATES)
    if override is not None:
        if override not in TEMPLATES:
            raise ConfigError(f"{FLAG} {show(override)} is not a template; choose one of {names}")
        return TEMPLATES[override]
    evidence = {}
    chat = chat_template_text(model_dir)
    if chat is not None:
        evidence["its chat template"] = template_from_chat_template(chat)
        if evidence["its chat template"] is None:
            raise ConfigError(f"{model_dir}: its chat template is none of {names}; pass {FLAG} NAME if you know "
                              "which one the model was trained with")
    if layout == "original" and family != "internvl" and template_from_name(model_dir):
        evidence["its name"] = template_from_name(model_dir)
    by_decoder = "internvl2_5" if family == "internvl" else template_from_decoder(model_type, vocab_size, has_chatml)
    if by_decoder:
        evidence[f"its decoder ({model_type}, {vocab_size} embeddings)"] = by_decoder
    found = set(evidence.values())
    # llava_v1 and vicuna_v1 are one family (Vicuna); a chat template that names vicuna_v1 picks it
    if found == {"llava_v1", "vicuna_v1"}:
        found = {"vicuna_v1"}
    # ChatML markers are both chatml_direct's and qwen_1_5's: a Qwen2 decoder (OneVision) tells them apart
    if found == {"chatml_direct", "qwen_1_5"}:
        found = {"qwen_1_5"}
    if found == {"chatml_direct", "internvl2_5"}:  # and InternVL's (its -hf chat template marks no image)
        found = {"internvl2_5"}
    if len(found) != 1:
        said = "; ".join(f"{k} says {v}" for k, v in evidence.items()) or "no chat template, name or decoder says"
        raise ConfigError(f"{model_dir}: cannot tell which conversation template the model was trained with "
                          f"({said}); pass {FLAG} with one of {names}")
    return TEMPLATES[found.pop()]


VICUNA = ("llava_v1", "vicuna_v1")  # one family: the prompts differ by two words of the system text
VICUNA_PIECES = 32000  # LLaMA's (and so Vicuna's) sentencepiece vocabulary


def is_llava_vicuna(model_dir: Path, layout: str, template: str, n_pieces: int) -> bool:
    """Whether a checkpoint with a Vicuna template is one of LLaVA-1.6's Vicuna models (liuhaotian's or
    llava-hf's), which LLaVA's benchmark scripts prompt with vicuna_v1, rather than a model trained
    elsewhere with its template (the tiny model shipped here): it says so itself (llava-hf's chat template,
    or an original-layout name run_llava.py maps to llava_v1) or has Vicuna's 32,000 pieces."""
    if template not in VICUNA:
        return False
    named = layout == "original" and template_from_name(model_dir) in VICUNA
    return chat_template_text(model_dir) is not None or named or n_pieces == VICUNA_PIECES
