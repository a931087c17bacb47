"""Pruning between layers (minillava/schedule.py): a schedule of several stages in the decoder and in the
vision tower, against the same layers run without a cache on the kept tokens, and what follows from a
schedule (cache slots, FLOPs)."""

import copy
from dataclasses import dataclass

import pytest
import torch

from minillava.clip import ClipTower
from minillava.config import TextConfig, VisionConfig
from minillava.flops import LlmSpec, layered_prefill_flops, prefill_flops
from minillava.llama import Decoder
from minillava.schedule import Between, apply_stage, layer_lengths

TEXT = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


@dataclass(frozen=True)
class Fixed:
    """A stage that keeps fixed indices of its input, optionally putting merged tokens (x * 2) there."""

    layer: int
    index: tuple[int, ...]
    length: int  # tokens it sees
    merge: bool = False

    @property
    def dropped(self) -> int:
        return self.length - len(self.index)

    def keep(self, between):
        assert between.x.shape[1] == self.length
        index = torch.tensor(self.index)
        return (index, between.x[:, index] * 2) if self.merge else index


@dataclass(frozen=True)
class ByAttention:
    """A stage that keeps the `count` tokens of [start, end) the last query of layer K-1 attends to most,
    and every other token: FastV's rule, here to check what `Between` lends."""

    layer: int
    start: int
    end: int
    count: int

    @property
    def dropped(self) -> int:
        return self.end - self.start - self.count

    def keep(self, between):
        q, k = between.query_key(self.layer - 1, between.previous_input)
        scores = torch.softmax(q[:, :, -1:] @ k.transpose(2, 3) / q.shape[-1] ** 0.5, dim=-1).mean(1)[0, 0]
        top = scores[self.start : self.end].topk(self.count).indices + self.start
        t = between.x.shape[1]
        return torch.cat([torch.arange(self.start), top, torch.arange(self.end, t)]).sort().values


def reference(decoder: Decoder, embeds: torch.Tensor, stages, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Last hidden state after the prompt and after each of `steps` (1, 1, D) appended: every time the
    whole sequence from scratch without a cache, the stages applied to the prompt's tokens only (what
    they keep is read off the prompt's pass), every answer token kept, causal by position."""
    ref = copy.deepcopy(decoder)
    ref.setup_rope(256)
    kept = {}  # layer -> indices of the prompt it keeps
    x, pos = embeds, torch.arange(embeds.shape[1])
    layer_input = x
    for i, layer in enumerate(ref.layers):
        for stage in stages:
            if stage.layer == i:
                cos, sin = ref.positions(pos)
                x, index = apply_stage(stage, Between(layer_input, x, lambda j, h, c=cos, s=sin: ref.query_key(j, h, c, s), pos))
                kept[i], pos = index, pos[index]
        layer_input = x
        cos, sin = ref.positions(pos)
        x = layer(x, cos, sin, pos, prefill=True)
    out = [ref.norm(x)[:, -1]]
    merged = {s.layer: s for s in stages if getattr(s, "merge", False)}
    for n in range(1, len(steps) + 1):
        x = torch.cat([embeds, *steps[:n]], dim=1)
        pos = torch.arange(x.shape[1])
        for i, layer in enumerate(ref.layers):
            if i in kept:  # the prompt's tokens as the stage kept them, the answer's all
                prompt = x[:, kept[i]] * (2 if i in merged else 1)
                x = torch.cat([prompt, x[:, -n:]], dim=1)
                pos = torch.cat([pos[kept[i]], pos[-n:]])
            cos, sin = ref.positions(pos)
            x = layer(x, cos, sin, pos, prefill=True)
        out.append(ref.norm(x)[:, -1])
    return out


def cached(decoder: Decoder, embeds: torch.Tensor, stages, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    t = embeds.shape[1]
    lengths = layer_lengths(stages, t + len(steps), len(decoder.layers))
    decoder.setup_cache(1, lengths[0], layer_lengths=lengths)
    out = [decoder(embeds, torch.arange(t), prefill=True, schedule=stages)[:, -1]]
    for n, step in enumerate(steps):
        out.append(decoder(step, torch.tensor([t + n]))[:, -1])
    return out


@pytest.mark.parametrize("merge", [False, True])
def test_two_stages_in_the_decoder_equal_the_uncached_reference(merge):
    torch.manual_seed(0)
    decoder = Decoder(TEXT).eval()
    embeds = torch.randn(1, 20, TEXT.hidden_size)
    steps = [torch.randn(1, 1, TEXT.hidden_size) for _ in range(4)]
    first = Fixed(1, tuple(i for i in range(20) if i % 3), 20, merge=merge)  # 13 of 20
    second = ByAttention(3, 2, 12, 4)  # of the 14: 4 of [2, 12) kept
    stages = (first, second)
    assert layer_lengths(stages, 24, 5) == [24, 17, 17, 11, 11]
    with torch.no_grad():
        want, got = reference(decoder, embeds, stages, steps), cached(decoder, embeds, stages, steps)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # the second stage's layers hold the positions both stages kept, in order
    pos = decoder.layers[3].self_attn.cache.pos[0, :11].tolist()
    assert pos[-4:] == [20, 21, 22, 23] and pos[:7] == sorted(pos[:7]) and set(pos[:7]) <= set(first.index)


@dataclass(frozen=True)
class Adding:
    """A renumbering stage that keeps fixed indices and puts `added` tokens (the mean of the tokens it
    dropped, times 1 .. added) after position `after` of what it keeps (index -1): SparseVLM's recycling."""

    layer: int
    index: tuple[int, ...]
    length: int
    after: int
    added: int
    renumber: bool = True

    @property
    def dropped(self) -> int:
        return self.length - len(self.index) - self.added

    def keep(self, between):
        x, keep = between.x, list(self.index)
        assert between.embeds.shape[1] == 20  # the decoder's input, whatever earlier stages did
        gone = x[:, [i for i in range(self.length) if i not in keep]].mean(1, keepdim=True)
        new = torch.cat([gone * (j + 1) for j in range(self.added)], dim=1)
        tokens = torch.cat([x[:, keep[: self.after]], new, x[:, keep[self.after :]]], dim=1)
        index = torch.tensor(keep[: self.after] + [-1] * self.added + keep[self.after :])
        return index, tokens


def test_a_stage_that_adds_tokens_equals_the_uncached_renumbered_reference():
    """Added tokens (index -1) in a renumbered sequence: the cached prefill and decode steps equal the
    whole sequence run again at contiguous positions; `dropped` counts net; kept positions skip them."""
    torch.manual_seed(2)
    decoder = Decoder(TEXT).eval()
    embeds = torch.randn(1, 20, TEXT.hidden_size)
    steps = [torch.randn(1, 1, TEXT.hidden_size) for _ in range(3)]
    first = Adding(2, tuple(i for i in range(20) if i % 4), 20, after=6, added=2)  # 15 kept + 2 = 17
    second = Adding(4, tuple(range(0, 17, 2)), 17, after=3, added=1)  # 9 kept + 1 = 10
    stages = (first, second)
    assert layer_lengths(stages, 23, 5) == [23, 23, 20, 20, 13]
    with torch.no_grad():
        got = cached(decoder, embeds, stages, steps)
        # the reference: the prompt's pass gives each stage's tokens; then every step renumbered 0 .. n-1
        x, layer_input, seen = embeds, embeds, {}
        for i, layer in enumerate(decoder.layers):
            if i in (2, 4):
                stage = first if i == 2 else second
                cos, sin = decoder.positions(torch.arange(x.shape[1]))
                x, index = apply_stage(stage, Between(layer_input, x, lambda j, h, c=cos, s=sin: decoder.query_key(j, h, c, s),
                                                      torch.arange(x.shape[1]), embeds))
                seen[i] = index
            layer_input = x
            decoder.setup_rope(64)
            cos, sin = decoder.positions(torch.arange(x.shape[1]))
            x = layer(x, cos, sin, torch.arange(x.shape[1]), prefill=True)
        want = [decoder.norm(x)[:, -1]]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    # decode steps: the cached layers hold the renumbered prompt, each step at the next contiguous position
    with torch.no_grad():
        lengths = layer_lengths(stages, 23, 5)
        decoder.setup_cache(1, lengths[0], layer_lengths=lengths)
        decoder(embeds, torch.arange(20), prefill=True, schedule=stages)
        assert decoder.kept.tolist() == [1, 3, 6, -1, -1, 9, 11, 14, 17, 19]  # an added token kept again stays -1
        prompts = {}  # layer -> the prompt's tokens that layer's input held, from a cacheless replay
        x, layer_input = embeds, embeds
        for i, layer in enumerate(decoder.layers):
            if i in (2, 4):
                stage = first if i == 2 else second
                cos, sin = decoder.positions(torch.arange(x.shape[1]))
                x, _ = apply_stage(stage, Between(layer_input, x, lambda j, h, c=cos, s=sin: decoder.query_key(j, h, c, s),
                                                  torch.arange(x.shape[1]), embeds))
            prompts[i] = x
            layer_input = x
            cos, sin = decoder.positions(torch.arange(prompts[i].shape[1]))
            saved, layer.self_attn.cache = layer.self_attn.cache, None  # the cache untouched
            x = layer(prompts[i], cos, sin, torch.arange(prompts[i].shape[1]), prefill=True)
            layer.self_attn.cache = saved
        outs = []
        for n, step in enumerate(steps):
            outs.append(decoder(step, torch.tensor([20 + n]))[:, -1])
        for n in range(1, len(steps) + 1):
            h = None
            for i, layer in enumerate(decoder.layers):
                answer = torch.cat(steps[:n], dim=1) if h is None else h
                seq = torch.cat([prompts[i], answer], dim=1)
                pos = torch.arange(seq.shape[1])
                cos, sin = decoder.positions(pos)
                saved, layer.self_attn.cache = layer.self_attn.cache, None
                h = layer(seq, cos, sin, pos, prefill=True)[:, -n:]
                layer.self_attn.cache = saved
            torch.testing.assert_close(outs[n - 1], decoder.norm(h)[:, -1], rtol=1e-5, atol=1e-5)

    class Unnumbered(Adding):
        renumber = False

    decoder.setup_cache(1, 32)
    with pytest.raises(ValueError, match="added tokens"):
        decoder(embeds, torch.arange(20), prefill=True, schedule=(Unnumbered(2, first.index, 20, 6, 2, False),))


def test_schedules_are_checked():
    decoder = Decoder(TEXT).eval()
    embeds, pos = torch.randn(1, 10, TEXT.hidden_size), torch.arange(10)
    decoder.setup_cache(1, 16)
    for bad in [(Fixed(0, (1, 2), 10),), (Fixed(5, (1, 2), 10),), (Fixed(3, (1,), 10), Fixed(2, (0,), 1))]:
        with pytest.raises(ValueError, match="a schedule prunes before layers 1 .. 4"):
            decoder(embeds, pos, prefill=True, schedule=bad)
    with pytest.raises(ValueError, match="pruned in a prefill of one prompt"):
        decoder(embeds, pos.expand(2, -1), prefill=True, schedule=(Fixed(1, (1,), 10),))

    class Liar(Fixed):
        @property
        def dropped(self) -> int:
            return 0

    with pytest.raises(ValueError, match="said it drops 0 of 10 tokens but kept 2"):
        decoder(embeds, pos, prefill=True, schedule=(Liar(1, (1, 2), 10),))


def test_a_stage_in_the_tower_equals_the_layers_run_on_what_it_keeps():
    torch.manual_seed(1)
    cfg = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       image_size=28, patch_size=7)
    tower = ClipTower(cfg).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.2)
    pixels = torch.randn(3, 3, 28, 28)
    stage = Fixed(2, (0, 3, 4, 9, 15, 16), 17, merge=True)  # [CLS] and five patches, merged (x 2)
    with torch.no_grad():
        got = tower(pixels, (1, -1), schedule=(stage,))
        x = tower.embed(pixels)
        for layer in tower.encoder.layers[:2]:
            x = layer(x)
        assert torch.equal(got[1], tower(pixels, (1,))[1])  # before the stage: every token
        x = x[:, list(stage.index)] * 2
        for layer in tower.encoder.layers[2:]:
            x = layer(x)
    torch.testing.assert_close(got[-1], x, rtol=0, atol=0)
    q, k = tower.layer_query_key(0, tower.embed(pixels))
    assert q.shape == k.shape == (3, 4, 17, 8)


def test_flops_follow_the_schedule():
    spec = LlmSpec("hand", layers=5, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=64)
    stages = (Fixed(1, tuple(range(14)), 20), ByAttention(3, 2, 12, 4))
    per = layer_lengths(stages, 20, 5)
    assert per == [20, 14, 14, 8, 8]
    one = lambda t: (prefill_flops(spec, t)["total"] - prefill_flops(spec, 0)["total"]) // 5  # noqa: E731
    assert layered_prefill_flops(spec, per) == sum(one(t) for t in per) + 2 * 32 * 64
