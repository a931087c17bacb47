"""Train a tiny LLaVA-NeXT on the synthetic scenes, from a seed, with this project's modules.

    python scripts/train_tiny.py                       # 100 min on 2 busy CPU cores -> weights/llava-next-tiny-scenes
    python scripts/train_tiny.py --quick --out /tmp/t  # a minute or two: the whole pipeline, a weak model

Same code paths as the 7B model, only the config is small: a CLIP ViT (width 128, 4 layers, 112 px
tiles of 8 x 8 patches), AnyRes with LLaVA-1.6's pinpoints divided by 3, the mlp2x_gelu projector, a
LLaMA decoder (width 192, 4 layers of 8 heads) and a sentencepiece tokenizer trained on the task's text.

Stage 1, the tower: multi-label classification of the cards in each tile (colours, digits and
(colour, digit) pairs) from the LAST layer's [CLS] output, on thumbnails and crops of scenes with 3 to 5
cards, plus a per-patch colour and digit classifier on layer -2. LLaVA reads features from the
penultimate layer and never trains the last one, but GlobalCom2 scores tokens by the last layer's [CLS]
attention, so that layer has to learn to look at the objects here.
Stage 2, LLaVA-1.5-style: the tower frozen (each scene's features computed once), projector, image
newline, decoder and head trained on the questions, loss on the answer tokens only; the prompt is
token for token what `generate` feeds the model, with the uncompressed image. Half of each batch is the
card family ("What digit is on the red card?", one card), half the dense family ("What is the largest
digit?", 3 to 8 cards in one region; `synthetic.py`), so one model answers both. (Showing one sample in
ten its thumbnail alone, to make thumbnail-only accuracy a fair measure, backfired: the decoder learnt
"a short image means guess", and answered compressed images, r <= 0.25, at chance even when the card's
token was kept.)

What did not work (kept here so nobody repeats it): with 3 to 5 cards per scene and questions that
name a card by its colour ("the digit on the red card"), stage 2 stays at chance for thousands of
steps, the associative-recall plateau of small transformers (the same decoder fails on the text-only
version, "red 3 blue 7 ..." then the question, within 5,000 samples); with answer words split into
several pieces (a 400-piece vocabulary is mostly byte-fallback pieces) it is worse. One card per scene
leaves the part GlobalCom2 is about: finding the one token of ~350 that holds the answer.

The checkpoint (float16 safetensors in the transformers hub layout, config.json, tokenizer.model)
loads through `minillava.weights.load_model`. The loss log goes to <out>/train_log.txt.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minillava.anyres import Tiles, tile_image  # noqa: E402
from minillava.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from minillava.eval import synthetic as S  # noqa: E402
from minillava.layout import unpad_area  # noqa: E402
from minillava.model import Encoded, Llava  # noqa: E402
from minillava.tokenizer import Tokenizer, build_prompt  # noqa: E402

NAME = "llava-next-tiny-scenes"
TILE = S.TILE  # 8 x 8 patches of 14 px
PATCH = 14
PINPOINTS = S.PINPOINTS  # (w, h): LLaVA-1.6's / 3, what the scenes are drawn for
SP_VOCAB = 500  # sentencepiece pieces: 3 special + 256 byte-fallback + characters + merges (every answer one piece)
N_LABELS = len(S.COLOURS) + len(S.DIGITS) + len(S.COLOURS) * len(S.DIGITS)  # colours, digits, pairs
TOWER_CARDS = (3, 5)  # stage 1 scenes: several cards, more to learn per tile
BARE_QUESTION = 0.3  # share of questions asked without "Answer the question using a single word or phrase."


def model_config(vocab: int) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                            image_size=TILE, patch_size=14),
        text=TextConfig(vocab_size=vocab, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=8, max_position_embeddings=1024, rms_norm_eps=1e-5),
        grid_pinpoints=PINPOINTS,
    )


def train_tokenizer(path: Path) -> Tokenizer:
    """A LLaMA-style sentencepiece model (unk 0, bos 1, eos 2, byte fallback) on the task's text."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(S.tokenizer_corpus() * 20), model_writer=buf, vocab_size=SP_VOCAB,
        hard_vocab_limit=False, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    tok = Tokenizer(path)
    split = [w for w in [*S.COLOURS, *S.DIGITS] if len(tok.encode(w)) != 1]
    if split:  # an answer spelt in several pieces is a much harder target (the first one trains at chance)
        raise SystemExit(f"the tokenizer splits the answers {split}; raise SP_VOCAB")
    return tok


def init_weights(model: Llava, seed: int):
    """GPT-style init: normal(0, 0.02) matrices and embeddings, zero biases, unit norms."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:  # LayerNorm / RMSNorm weights and biases (pre_layrnorm, post_layernorm too)
            nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.normal_(p, std=0.02)


# ----------------------------------------------------------------------------- data


def tile_labels(sample: S.Sample, tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of each tile (thumbnail, then crops):

    cards  (1 + crops, N_LABELS) multi-hot: the cards in the tile (the thumbnail: all of them) as colour,
           digit and (colour, digit) pair; a card belongs to the crop holding its centre on the canvas.
    patch  (1 + crops, P, 2) long: (colour, digit) of the card centred in each patch, or
           (len(COLOURS), len(DIGITS)) for no card.
    """
    gw, side = tiles.grid[0], TILE // PATCH
    cards = torch.zeros(tiles.pixels.shape[0], N_LABELS)
    patch = torch.tensor([len(S.COLOURS), len(S.DIGITS)]).repeat(tiles.pixels.shape[0], side * side, 1)
    colours, n_colours = list(S.COLOURS), len(S.COLOURS)
    for card in sample.scene.cards:
        c, d = colours.index(card.colour), S.DIGITS.index(card.digit)
        hot = [c, n_colours + d, n_colours + len(S.DIGITS) + c * len(S.DIGITS) + d]
        (tr, tc), (gr, gc) = S.card_cells(card, tiles.size, PINPOINTS, TILE, PATCH)
        crop = 1 + gr // side * gw + gc // side
        cards[[0, crop]] = cards[[0, crop]].index_fill(1, torch.tensor(hot), 1.0)
        patch[0, tr * side + tc] = torch.tensor([c, d])
        patch[crop, gr % side * side + gc % side] = torch.tensor([c, d])
    return cards, patch


def prompt_for(sample: S.Sample, rng: np.random.Generator) -> str:
    """What the user says after `<image>\n`: the question with the benchmarks' short-answer line or,
    with probability BARE_QUESTION, the question alone."""
    return sample.question if rng.random() < BARE_QUESTION else S.prompt(sample.question)


def batch_samples(seed: int, start: int, n: int) -> list[tuple[Tiles, tuple]]:
    """Stage-1 training scenes start .. start+n-1 (3 to 5 cards): (tiles, tile labels)."""
    out = []
    for i in range(start, start + n):
        s = S.sample(seed, "train", i, TOWER_CARDS)
        tiles = tile_image(s.scene.image, PINPOINTS, TILE)
        out.append((tiles, tile_labels(s, tiles)))
    return out


# ----------------------------------------------------------------------------- forward passes


def card_losses(heads: nn.ModuleDict, features: torch.Tensor, cls: torch.Tensor, labels) -> dict[str, torch.Tensor]:
    """The tower's objectives. [CLS] of the last layer: binary cross-entropy per label group (colours,
    digits, (colour, digit) pairs in the tile). Patch features of layer -2 (what the projector reads):
    cross-entropy of the colour and digit of the card centred in each patch (or none). Thumbnails are
    asked only for colours: their digits are a blur by design. Also returns "acc", the digit accuracy
    on the crops' card patches (a measure, not a loss): (losses, measures)."""
    cards = torch.cat([y for y, _ in labels])  # (N, N_LABELS)
    patch = torch.cat([z for _, z in labels])  # (N, P, 2)
    crop = torch.cat([torch.arange(len(y)) > 0 for y, _ in labels])  # (N,) False for thumbnails
    a, b = len(S.COLOURS), len(S.COLOURS) + len(S.DIGITS)
    logits = heads["cls"](cls)  # (N, N_LABELS)
    bce = F.binary_cross_entropy_with_logits
    colour = heads["patch_colour"](features)  # (N, P, colours + 1)
    digit = heads["patch_digit"](features)[crop]  # (crops, P, digits + 1)
    digit_truth = patch[crop][..., 1]  # (crops, P)
    on_card = digit_truth < len(S.DIGITS)
    losses = {"colour": bce(logits[:, :a], cards[:, :a]), "digit": bce(logits[crop, a:b], cards[crop, a:b]),
              "pair": bce(logits[crop, b:], cards[crop, b:]),
              "patch": F.cross_entropy(colour.flatten(0, 1), patch[..., 0].flatten())
              + F.cross_entropy(digit.flatten(0, 1), digit_truth.flatten())}
    return losses, {"acc": (digit.argmax(-1)[on_card] == digit_truth[on_card]).float().mean().detach()}


def make_heads(width: int) -> nn.ModuleDict:
    """The tower's training heads (not shipped)."""
    return nn.ModuleDict({"cls": nn.Linear(width, N_LABELS), "patch_colour": nn.Linear(width, len(S.COLOURS) + 1),
                          "patch_digit": nn.Linear(width, len(S.DIGITS) + 1)})


def tower_forward(model: Llava, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles (N, 3, S, S) -> (features of layer -2 without [CLS] (N, P, Dv), pooled last-layer [CLS] (N, Dv)).

    ClipTower.forward runs only up to the feature layer; the [CLS] objective needs the last layer's output."""
    tower = model.vision
    x = tower.pre_layrnorm(tower.embeddings(pixels))  # (N, 1 + P, Dv)
    for layer in tower.encoder.layers[:-1]:
        x = layer(x)
    cls = tower.encoder.layers[-1](x)[:, 0]  # (N, Dv)
    return x[:, 1:], tower.post_layernorm(cls)


@torch.no_grad()
def tower_features(model: Llava, seed: int, start: int, n: int, family: str = "card") -> list[tuple[S.Sample, tuple, tuple, torch.Tensor]]:
    """Stage-2 scenes start .. start+n-1 of a family (as held out: one card, or a dense region) through
    the frozen tower once: (sample, crop grid, image size, layer -2 features (tiles, P, Dv) in float16)."""
    out = []
    for i in tqdm(range(start, start + n), desc=f"tower features, {family}", dynamic_ncols=True, file=sys.stderr):
        s = S.sample(seed, "train", i, family=family)
        tiles = tile_image(s.scene.image, PINPOINTS, TILE)
        select = model.cfg.vision_feature_layer
        features = model.vision(tiles.pixels, (select,))[select][:, 1:]  # (tiles, P, Dv), [CLS] dropped
        out.append((s, tiles.grid, tiles.size, features.half()))
    return out


def answer_loss(model: Llava, tok: Tokenizer, batch, rng: np.random.Generator):
    """Answer cross-entropy of a batch of (sample, grid, size, tower features): each prompt token for
    token what generate() feeds the model with the uncompressed image, then the answer and </s>. Also
    the loss of each family's tokens alone, as measures: (loss, {"card": ..., "dense": ...})."""
    sequences, targets = [], []
    for s, grid, size, features in batch:
        x = model.projector(features.float())  # (tiles, P, D)
        area = unpad_area(grid, size, model.cfg.vision.patches_per_side)
        image = model.image_tokens(Encoded(x[0], x[1:], grid, size, area))  # uncompressed, as generate()
        prompt = model.prompt_embeds(tok.encode_prompt(build_prompt(prompt_for(s, rng))), [image])[0]  # (T, D)
        answer = tok.encode(s.answer) + [tok.eos_id]
        targets.append((len(prompt) - 1, answer))  # position p predicts the token at p + 1
        sequences.append(torch.cat([prompt, model.embed(answer)]))
    length = max(len(x) for x in sequences)
    x = torch.stack([F.pad(seq, (0, 0, 0, length - len(seq))) for seq in sequences])  # (B, T, D), right-padded
    model.llm.setup_rope(length)
    hidden = model.llm(x, torch.arange(length), prefill=True)  # causal: padding is never attended to
    rows, cols, ids = [], [], []
    for b, (first, answer) in enumerate(targets):
        rows += [b] * len(answer)
        cols += range(first, first + len(answer))
        ids += answer
    logits = model.logits(hidden[rows, cols])  # only the answer positions: (n, V)
    loss = F.cross_entropy(logits, torch.tensor(ids), reduction="none")  # (n,)
    family = torch.tensor([batch[b][0].category == "largest" for b in rows])  # (n,) the dense family's tokens
    measures = {name: loss[mask].mean().detach() for name, mask in (("card", ~family), ("dense", family)) if mask.any()}
    return loss.mean(), measures


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- stages


def run_stage(name, steps, make_batch, loss_fn, optimizer, log, every=25):
    """The loop both stages share: scheduled learning rates, a progress bar, a line of the mean losses
    and measures every `every` steps. `loss_fn(batch)` returns (losses, measures): their sum is minimised,
    the measures (an accuracy, one family's loss) are only logged."""
    base = [g["lr"] for g in optimizer.param_groups]
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True, file=sys.stderr)
    running, t0 = {}, time.perf_counter()
    for step in bar:
        for g, lr in zip(optimizer.param_groups, base):
            g["lr"] = lr * schedule(step, steps, max(steps // 20, 1))
        losses, measures = loss_fn(make_batch(step))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        for k, v in {**losses, **measures}.items():  # (sum, count): a family's measure is absent from some steps
            sum_, n = running.get(k, (0.0, 0))
            running[k] = (sum_ + v.item(), n + 1)
        if (step + 1) % every == 0 or step + 1 == steps:
            means = {k: sum_ / n for k, (sum_, n) in running.items()}
            bar.set_postfix({k: f"{v:.3f}" for k, v in means.items()})
            log(f"{name}\tstep {step + 1}\t{time.perf_counter() - t0:.0f}s\t"
                + "\t".join(f"{k} {v:.4f}" for k, v in means.items()))
            running = {}
    for g, lr in zip(optimizer.param_groups, base):
        g["lr"] = lr


def save(model: Llava, tok_path: Path, out: Path, image_token: int):
    """config.json, model.safetensors (float16, transformers hub key names) and tokenizer.model."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    v, t = cfg.vision, cfg.text
    names = [("vision.", "vision_tower.vision_model."), ("projector.", "multi_modal_projector."),
             ("llm.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
             ("image_newline", "image_newline")]
    state = {}
    for key, value in model.state_dict().items():
        ours, hub = next((a, b) for a, b in names if key.startswith(a))
        state[hub + key[len(ours):]] = value.detach().to(torch.float16).contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "image_token_index": image_token,
        "image_grid_pinpoints": [[h, w] for w, h in cfg.grid_pinpoints],  # transformers: (height, width)
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "image_seq_length": v.patches_per_side ** 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": v.num_channels,
            "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps, "projection_dim": v.hidden_size,
        },
        "text_config": {
            "model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "tokenizer.model").write_bytes(tok_path.read_bytes())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the tiny LLaVA-NeXT on the synthetic scenes (see the module docstring).")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "weights" / NAME,
                   help=f"checkpoint folder to write (default weights/{NAME})")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the training scenes (default 0)")
    p.add_argument("--stage1-steps", type=int, default=1500, help="tower pretraining steps (default 1500)")
    p.add_argument("--stage1-batch", type=int, default=8, help="scenes per tower step (default 8)")
    p.add_argument("--stage2-scenes", type=int, default=8000, help="question-answering scenes of each family (default 8000)")
    p.add_argument("--stage2-steps", type=int, default=7000, help="question-answering steps (default 7000)")
    p.add_argument("--stage2-batch", type=int, default=8, help="scenes per step, half of each family (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of stage 1 (default 2e-3)")
    p.add_argument("--lr2", type=float, default=1e-3, help="peak learning rate of stage 2 (default 1e-3)")
    p.add_argument("--stage1-cache", type=Path, metavar="FILE.pt",
                   help="load the stage-1 tower and heads from FILE.pt if it exists, else save them there after stage 1 "
                   "(to rerun stage 2 alone; the file is only valid for the same seed and stage-1 settings)")
    p.add_argument("--eval", type=int, default=300, help="held-out questions to score at the end (default 300; 0: none)")
    p.add_argument("--quick", action="store_true", help="a few minutes: 100 + 100 steps, 100 held-out questions")
    args = p.parse_args(argv)
    if args.quick:
        args.stage1_steps, args.stage2_scenes, args.stage2_steps, args.eval = 100, 200, 100, 100
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "train_log.txt", "w", encoding="utf-8")

    def log(line: str):
        log_file.write(line + "\n")
        log_file.flush()
        tqdm.write(line, file=sys.stderr)

    log(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, {torch.get_num_threads()} threads")
    tok_path = args.out / "tokenizer.model"
    tok = train_tokenizer(tok_path)
    vocab = -(-(tok.n_pieces + 1) // 64) * 64  # embedding rows: the pieces, then padding; the last is <image>
    model = Llava(model_config(vocab))
    init_weights(model, args.seed)
    head = make_heads(model.cfg.vision.hidden_size)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"# {tok.n_pieces} tokenizer pieces, {vocab} embedding rows; {n_params / 1e6:.2f}M parameters")
    t_start = time.perf_counter()

    # Stage 1: the tower, [CLS] of the last layer -> the cards of each tile.
    b1 = args.stage1_batch

    def stage1_loss(batch):
        pixels = torch.cat([tiles.pixels for tiles, _ in batch])
        features, cls = tower_forward(model, pixels)
        return card_losses(head, features, cls, [labels for _, labels in batch])

    tower = [*model.vision.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(tower, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    model.train()
    if args.stage1_cache is not None and args.stage1_cache.is_file():
        state = torch.load(args.stage1_cache)
        model.vision.load_state_dict(state["vision"])
        head.load_state_dict(state["heads"])
        log(f"# stage 1 loaded from {args.stage1_cache}")
    else:
        run_stage("stage 1", args.stage1_steps, lambda step: batch_samples(args.seed, step * b1, b1), stage1_loss, opt, log)
        if args.stage1_cache is not None:
            torch.save({"vision": model.vision.state_dict(), "heads": head.state_dict()}, args.stage1_cache)

    # Stage 2: questions, LLaVA-1.5 style: the tower frozen (its features computed once per scene),
    # projector, newline, decoder and head trained on the answers.
    model.vision.requires_grad_(False)
    model.vision.eval()
    scenes = {family: tower_features(model, args.seed, args.stage1_steps * b1, args.stage2_scenes, family)
              for family in S.FAMILIES}  # fresh scenes (the dense family's are another stream anyway)
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    opt = torch.optim.AdamW(rest, lr=args.lr2, weight_decay=0.05, betas=(0.9, 0.98))
    rng = np.random.default_rng([args.seed, 2])
    b2 = args.stage2_batch

    def stage2_batch(step):
        half = b2 // 2 + (step % 2) * (b2 % 2)  # an odd batch alternates which family gets the extra scene
        return [family[i] for family, k in ((scenes["card"], half), (scenes["dense"], b2 - half))
                for i in rng.integers(len(family), size=k)]

    def stage2_loss(batch):
        loss, measures = answer_loss(model, tok, batch, rng)
        return {"answer": loss}, measures

    run_stage("stage 2", args.stage2_steps, stage2_batch, stage2_loss, opt, log)
    minutes = (time.perf_counter() - t_start) / 60
    log(f"# trained in {minutes:.1f} min")

    model.eval()
    save(model, tok_path, args.out, image_token=vocab - 1)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file()) / 2**20
    log(f"# wrote {args.out} ({size:.1f} MB)")
    if args.eval:
        from compression_table import evaluate  # scripts/ is on sys.path when run as a script

        for family in S.FAMILIES:
            accuracy = evaluate(args.out, args.eval, [("none", 1.0), ("thumbnail", 1.0)], family=family)[0]
            log(f"# held-out accuracy, {family} family ({args.eval} questions): uncompressed "
                f"{accuracy[('none', 1.0)]:.1f}%, thumbnail only {accuracy[('thumbnail', 1.0)]:.1f}%")
    log_file.close()


if __name__ == "__main__":
    main()
