"""The plan: shapes and repeat counts of one run ("full" or "quick"), and the workload every run shares
(the tower's shapes, LLaVA-1.6's grid, the prompt's text tokens, the ratios)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from minillava.config import KNOWN_TOWERS, LlavaConfig, TextConfig, VisionConfig


CLIP_L336 = KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]
PINPOINTS = LlavaConfig().grid_pinpoints  # LLaVA-1.6's, (width, height)
PROMPT_TOKENS = 64  # text tokens of an MME prompt around the image (see PROMPT_NOTE)
PROMPT_NOTE = (
    "text tokens: 64, an estimate of an MME prompt in LLaVA's vicuna_v1 template: BOS + system sentence "
    "(~35 pieces) + 'USER:' / newline / ' ASSISTANT:' (~8) + a question such as 'Is there a dog in this image? "
    "Please answer yes or no.' (~15), rounded up"
)
RATIOS = (1.0, 0.75, 0.5, 0.25, 0.1)


@dataclass
class Plan:
    name: str  # "full" or "quick"
    representative: bool  # False: the ratios say nothing about speed (smoke test shapes)
    vision: VisionConfig  # the tower of rows 1, 2 and 8
    tiles: int  # tiles per tower call (5 = thumbnail + 2 x 2 crops)
    text: TextConfig  # the decoder of rows 3-7
    prefill_lengths: tuple[int, ...]  # prompt lengths of row 3
    decode_prompt: int  # prompt length before the decode of row 4
    new_tokens: int  # tokens generated per decode run (the first comes out of the prefill)
    repeats: dict[str, int]  # timed calls per side after the warm-up, per section
    matmul_n: int  # side of the bare matmul of row 5
    copy_bytes: int  # size of the bare copy of row 6
    ckpt_vision: VisionConfig  # the checkpoint of row 9
    ckpt_text: TextConfig
    ckpt_shards: int = 4
    ckpt_dtype: str = "float16"
    load_float32: bool = True  # also load the checkpoint into float32 (reported apart, no target)
    compile: bool = True  # torch.compile the decode step (row 4) and, as extra information, the prefill (row 3)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    batch_questions: int = 64  # synthetic questions answered per side of row 10
    batch_sizes: tuple[int, ...] = (1, 8, 32)  # --batch-size of the sides of row 10 (rows 11a, 11b: 1 and 8)


def decoder_1b() -> TextConfig:
    """LLaMA at width 2048, 16 layers, MLP 5632, 32 heads, vocab 32000: 0.95B parameters."""
    return TextConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def make_plan(name: str) -> Plan:
    if name == "full":
        return Plan(
            name="full", representative=True, vision=CLIP_L336, tiles=5, text=decoder_1b(),
            prefill_lengths=(700, 2900), decode_prompt=128, new_tokens=32,
            repeats={"vision": 3, "prefill": 3, "compressed": 3, "decode": 5, "matmul": 10, "copy": 10, "compress": 20,
                     "batch": 3},
            matmul_n=2048, copy_bytes=1 << 30, ckpt_vision=CLIP_L336, ckpt_text=decoder_1b(),
        )
    if name == "quick":
        small = TextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                           num_attention_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5)
        return Plan(
            name="quick", representative=False, vision=dataclasses.replace(CLIP_L336, num_hidden_layers=2), tiles=2,
            text=small, prefill_lengths=(64, 256), decode_prompt=32, new_tokens=8,
            repeats={"vision": 2, "prefill": 2, "compressed": 2, "decode": 2, "matmul": 5, "copy": 5, "compress": 5,
                     "batch": 1},
            matmul_n=1024, copy_bytes=1 << 26,
            ckpt_vision=dataclasses.replace(CLIP_L336, num_hidden_layers=2), ckpt_text=small, ckpt_shards=2,
            batch_questions=16, batch_sizes=(1, 8, 16),
        )
    raise ValueError(f"unknown plan {name!r}")
