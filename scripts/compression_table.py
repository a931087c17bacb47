"""GlobalCom2 against its ablations and its peers on the synthetic scenes: the paper's table, in miniature.

    python scripts/compression_table.py [--model weights/llava-next-tiny-scenes] [--n 500] [--family both]
                                        [--plot examples/compression.png] [--methods globalcom2-sim,...]

Answers held-out questions of both scene families (`minillava.eval.synthetic`): the card family (the
`synthetic` task: one card, "What digit is on the red card?") and the dense family (the `synthetic-dense`
task: 3 to 8 cards in one region, "What is the largest digit?"), greedily, uncompressed, with the
thumbnail alone (crops removed), with every compressor at r = 0.5, 0.25, 0.1 (the peers included;
FastV prunes the uncompressed image in the decoder's prefill), and with an oracle: uniform's total crop
budget given to the crops that hold the cards, tokens chosen by each crop's own [CLS] scores (the
`local-only` selection), the ceiling of what budget allocation alone can buy. GlobalCom2 and its
ablations run with each token score (NAME, NAME-attn, NAME-sim: globalcom2/scores.py). `--methods`
measures only the rows named (with the uncompressed and thumbnail-only rows, which the table is relative
to), e.g. to add rows to the docs' tables; it writes no plot unless --plot is given.

Diagnostics per setting: how often the deciding card's token (the crop token at the centre of the card
the answer needs) was kept, how often it was kept or merged into a kept token (VisionZip's contextual
tokens, PruMerge+'s clusters), and the share of the kept crop tokens that lie in the crops holding the
cards. Per family and token score, the spread of GlobalCom2's crop ratios (max_c scale_c / r) and of the
thumbnail's region sums that produce them. Each image goes through the tower and projector once; its features
are then compressed by each method and answered as `minillava.generate.generate` does (same prompt, same
prefill and decode step). Prints markdown tables and saves PNG plots of accuracy against r (drawn with
PIL): the card family's to --plot, the dense family's next to it with `_dense` added. `--n 5` is a
quick smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import globalcom2  # noqa: E402
from globalcom2.layout import area_mask, crop_extents, to_crops  # noqa: E402
from globalcom2.scoring import TEMPERATURE, crop_scales, kept_counts, region_sums  # noqa: E402
from minillava.anyres import tile_image  # noqa: E402
from minillava.compression import encode, stage_inputs  # noqa: E402
from minillava.eval import synthetic as S  # noqa: E402
from minillava.generate import decode_one_token, load, prefill  # noqa: E402
from minillava.trust import ConfigError  # noqa: E402
from minillava.layout import on_grid  # noqa: E402
from minillava.schedule import build as build_schedule, kept_positions  # noqa: E402
from minillava.tokenizer import build_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "weights" / "llava-next-tiny-scenes"
RATIOS = (0.5, 0.25, 0.1)
METHODS = tuple(m for m in globalcom2.METHODS if m != "none")  # every compressor, the peers and fastv included
EVERY_NEED = tuple(dict.fromkeys(need for m in globalcom2.METHODS for need in globalcom2.needs(m)))
ROWS = (*METHODS, "oracle")  # the table's rows after none and the thumbnail alone
GUIDANCE = {"cls_logits": "globalcom2", "cls_attn": "globalcom2-attn", "similarity": "globalcom2-sim"}  # score: method
TITLES = {"card": "card family (synthetic): one card, 'What digit is on the red card?'",
          "dense": "dense family (synthetic-dense): 3-8 cards in one region, 'What is the largest digit?'"}
FASTV_NOTE = ("FastV prunes before decoder layer K = 2; the tiny model's decoder has 4 layers, so layers 0-1 "
              "(half the decoder) see every image token and only layers 2-3 the kept ones")


@torch.inference_mode()
def greedy(model, tokenizer, tokens: torch.Tensor, question: str, max_new_tokens: int = 8, pruned=("none", 1.0)):
    """The answer to `question` about an image given as its token sequence (T, D), greedy. With `pruned`
    (a decoder-side method, r), `tokens` is the uncompressed image and the method keeps r of it in the
    prefill; then also the indices into `tokens` its last pruned layers see (else None)."""
    chunks = tokenizer.encode_prompt(build_prompt(question))
    embeds = model.prompt_embeds(chunks, [tokens])
    length, start = embeds.shape[1], len(chunks[0])
    stages = build_schedule(pruned[0], start, tokens.shape[0], pruned[1], model.cfg.text.num_hidden_layers)
    model.llm.setup_cache(1, length + max_new_tokens)  # every layer this long: pruned ones need fewer slots
    token = prefill(model, embeds, stages).argmax(-1)
    kept = kept_positions(model.llm, start, tokens.shape[0]) if stages else None
    ids = []
    for step in range(max_new_tokens):
        if token.item() == tokenizer.eos_id:
            break
        ids.append(token.item())
        token = decode_one_token(model, token.view(1, 1), torch.tensor([length + step])).argmax(-1)
    return tokenizer.decode(ids), kept


def oracle_scales(n_valid: np.ndarray, cards: np.ndarray, ratio: float) -> np.ndarray:
    """The oracle's crop ratios (C,): uniform's total crop budget, sum_c int(N_c r), all of it to the
    crops holding cards, in proportion to their cards (at most N_c each); what they cannot hold goes to
    the other crops in proportion to their size. `n_valid` (C,) valid tokens per crop, `cards` (C,)
    cards per crop. Ratios are (k_c + 0.5) / N_c, so that GlobalCom2's int(N_c * scale_c) is k_c."""
    n_valid = n_valid.astype(np.int64)
    k, left = np.zeros_like(n_valid), int(kept_counts(n_valid, np.full(len(n_valid), ratio)).sum())
    for group, weight in ((cards > 0, cards), (cards == 0, n_valid)):
        while left > 0 and (room := group & (k < n_valid)).any():
            share = np.where(room, weight, 0).astype(np.float64)
            add = np.minimum(np.floor(left * share / share.sum()).astype(np.int64), n_valid - k)
            if add.sum() == 0:  # fewer tokens left than crops with room: one to the largest share
                add[np.argmax(share)] = 1
            k, left = k + add, left - int(add.sum())
    return np.where(n_valid > 0, (k + 0.5) / np.maximum(n_valid, 1), 0.0)


def answer(model, tokenizer, image, features: globalcom2.ImageFeatures, question: str, method: str, ratio: float,
           seed: int = 0, cards=None, tiles=None):
    """The answer with one compressor, and what it kept (a `Compressed`; None for the thumbnail alone and
    for a method that merges inside the tower, whose tokens have no grid cell). `image` is the model's
    encoded image (minillava.model.Encoded), whose uncompressed sequence a decoder-side method (FastV)
    prunes in the decoder; `tiles` the image's tiles, which a tower method (FiCoCo-V) runs through the
    tower again with its schedule (ConfigError where it refuses this r); `cards` (C,) the number of cards
    in each crop, which only the oracle reads."""
    if method == "thumbnail":
        return greedy(model, tokenizer, features.thumb, question)[0], None
    if method in globalcom2.METHODS and globalcom2.method(method).place == globalcom2.TOWER:
        merged = encode(model, [tiles], method, ratio=ratio)[0]
        return greedy(model, tokenizer, model.image_tokens(merged), question)[0], None
    side = math.isqrt(features.thumb.shape[0])
    if method in globalcom2.METHODS and globalcom2.method(method).place == globalcom2.DECODER:
        text, kept = greedy(model, tokenizer, model.image_tokens(image), question, pruned=(method, ratio))
        thumb_keep, crop_keep = on_grid(kept, image.grid, image.area, side, model.cfg.anyres_max)
        return text, globalcom2.Compressed(thumb_keep, crop_keep, torch.zeros(0, dtype=torch.float64))
    if method == "oracle":
        rows, cols = crop_extents(image.area, image.grid, side)
        n_valid = np.outer(rows, cols).ravel()  # (C,) valid tokens per crop
        # uniform's crop budget: r of what the decoder would see (grid_share < 1 where the model downscales)
        scales = oracle_scales(n_valid, cards, ratio * features.grid_share)
        out = globalcom2.compress_image(features, "local-only", ratio, scales=scales)
    else:
        out = globalcom2.compress([features], method, ratio, seed=seed)[0]
    return greedy(model, tokenizer, model.image_tokens(image, out), question)[0], out


class Results(NamedTuple):
    """Per (method, ratio), in percent of the held-out questions: accuracy, deciding card's token kept,
    kept or merged, and the mean share of kept crop tokens in the crops holding cards. Per scene,
    GlobalCom2's guidance: max_c scale_c / r, the card crops' scale_c / r (their mean), whether a card
    crop has the largest ratio, and the spread of the thumbnail's region sums (max - min)."""

    accuracy: dict
    kept: dict
    merged: dict
    share: dict
    guidance: dict  # score -> per scene (max ratio / r, card crops' ratio / r, card crop has the largest, sums max - min)
    refused: dict  # (method, ratio) -> the one-line reason, for a setting the method cannot run (FiCoCo-V's small r)
    located: set  # the (method, ratio) whose kept tokens have grid cells (not a tower method's merged ones)


@torch.inference_mode()
def evaluate(model_dir: Path, n: int, configs: list[tuple[str, float]], seed: int = 0, family: str = "card") -> Results:
    """On held-out questions 0 .. n-1 of a family, per (method, ratio): accuracy in percent (exact match
    after lower-casing and stripping, as the `synthetic` tasks score) and the diagnostics of `Results`."""
    model, tokenizer = load(str(model_dir))
    cfg = model.cfg
    side = cfg.vision.image_size // cfg.vision.patch_size
    correct, kept, merged, share = ({c: 0.0 for c in configs} for _ in range(4))
    guidance = {score: [] for score in GUIDANCE}
    refused, located = {}, set()
    for i in tqdm(range(n), desc=f"held-out, {family}", dynamic_ncols=True, file=sys.stderr):
        s = S.sample(S.DEFAULT_SEED, "test", i, family=family)
        tiles = tile_image(s.scene.image, cfg.grid_pinpoints, cfg.vision.image_size)
        image = encode(model, [tiles], "none", extra=EVERY_NEED)[0]  # the probes of every method, one pass
        features = stage_inputs(model, [image])[0]
        valid = area_mask(image.area, (features.grid[1] * side, features.grid[0] * side), "cpu")  # (H, W)
        gw, gh = features.grid
        cells = [S.card_cells(card, s.scene.image.size, cfg.grid_pinpoints, cfg.vision.image_size,
                              cfg.vision.patch_size)[1] for card in s.scene.cards]
        cards = np.bincount([r // side * gw + c // side for r, c in cells], minlength=gw * gh)  # (C,) per crop
        cell = cells[s.scene.cards.index(S.deciding_card(s))]
        for score, method in GUIDANCE.items():
            thumb_scores = globalcom2.token_scores(features, method)[0]
            scale = crop_scales(thumb_scores, features.grid, min(RATIOS)) / min(RATIOS)  # unclipped there
            sums = region_sums(thumb_scores, features.grid)
            guidance[score].append((scale.max(), scale[cards > 0].mean(), bool(cards[np.argmax(scale)] > 0), np.ptp(sums)))
        for method, ratio in configs:
            if (method, ratio) in refused:
                continue
            try:
                text, out = answer(model, tokenizer, image, features, S.prompt(s.question), method, ratio, seed, cards,
                                   tiles)
            except ConfigError as e:  # the method cannot run at this r on this model: the same for every scene
                refused[(method, ratio)] = str(e)
                continue
            correct[(method, ratio)] += text.strip().lower() == s.answer
            if out is not None:
                located.add((method, ratio))
                into = out.crop_merge is not None and bool(out.crop_merge[cell] >= 0)
                kept[(method, ratio)] += bool(out.crop_keep[cell])
                merged[(method, ratio)] += bool(out.crop_keep[cell]) or into
                per_crop = to_crops(out.crop_keep & valid, features.grid, side).sum(1).numpy()  # (C,)
                share[(method, ratio)] += per_crop[cards > 0].sum() / max(per_crop.sum(), 1)
    percent = lambda counts: {c: 100.0 * k / n for c, k in counts.items()}  # noqa: E731
    return Results(percent(correct), percent(kept), percent(merged), percent(share), guidance, refused, located)


def guidance_summary(guidance: list, score: str = "cls_logits") -> str:
    """One paragraph on how far GlobalCom2's thumbnail guidance moved the budget over the scenes, with
    the token score `score`."""
    g = np.array(guidance, dtype=np.float64)  # (scenes, 4)
    q = lambda x: f"min {x.min():.3f}, median {np.median(x):.3f}, max {x.max():.3f}"  # noqa: E731
    name = "GlobalCom2" if score == "cls_logits" else f"GlobalCom2 with the {score} score ({GUIDANCE[score]})"
    sums = "[CLS] region sums" if score == "cls_logits" else f"region sums of the {score} score"
    return (f"{name}'s crop ratios over {len(g)} scenes, max_c scale_c / r (1 is uniform; the most the "
            f"softmax can give is 2 - 1/C, 1.5 for 2 crops, 1.75 for 4): {q(g[:, 0])}. The crops holding the "
            f"cards: scale_c / r {q(g[:, 1])}; they get the largest ratio in {100 * g[:, 2].mean():.1f}% of "
            f"scenes. The thumbnail's {sums} s_c differ by (max - min over crops) {q(g[:, 3])}: "
            f"softmax(s / {TEMPERATURE:g}) turns a difference d into a factor e^(d / {TEMPERATURE:g}) "
            f"(median {np.exp(np.median(g[:, 3]) / TEMPERATURE):.2f}).")


def plot(accuracy: dict, path: Path, title: str = "synthetic scenes", rows=ROWS):
    """Accuracy against r, one line per method (the oracle too), with the uncompressed and thumbnail-only levels."""
    width, height, left, right, top, bottom = 760, 500, 70, 190, 40, 60
    fig = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(fig)
    font = ImageFont.load_default(size=14)
    x_of = lambda r: left + (r - 0.05) / (0.55 - 0.05) * (width - left - right)  # noqa: E731
    y_of = lambda a: top + (100 - a) / 100 * (height - top - bottom)  # noqa: E731
    for a in range(0, 101, 20):
        d.line((left, y_of(a), width - right, y_of(a)), fill=(225, 225, 225))
        d.text((left - 8, y_of(a)), f"{a}%", fill="black", font=font, anchor="rm")
    for r in RATIOS:
        d.text((x_of(r), height - bottom + 8), f"{r}", fill="black", font=font, anchor="mt")
    d.text(((left + width - right) / 2, height - 22), "retention ratio r", fill="black", font=font, anchor="mm")
    d.text((left, 14), f"{title}: held-out accuracy vs kept visual tokens", fill="black", font=font)
    d.rectangle((left, top, width - right, height - bottom), outline="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127), (0, 0, 128), (128, 128, 0),
               (0, 128, 0), (255, 0, 255), (0, 0, 0), (255, 99, 71)]
    legend_y = top
    for (label, a), colour in [(("none", accuracy[("none", 1.0)]), (90, 90, 90)),
                               (("thumbnail only", accuracy[("thumbnail", 1.0)]), (170, 170, 170))]:
        y = y_of(a)
        for x in range(left, width - right, 12):
            d.line((x, y, min(x + 6, width - right), y), fill=colour, width=2)
        d.line((width - right + 12, legend_y + 7, width - right + 36, legend_y + 7), fill=colour, width=2)
        d.text((width - right + 42, legend_y), label, fill="black", font=font)
        legend_y += 22
    for i, method in enumerate(rows):
        colour = colours[i % len(colours)]
        points = [(x_of(r), y_of(accuracy[(method, r)])) for r in RATIOS if (method, r) in accuracy]  # not refused
        if len(points) > 1:
            d.line(points, fill=colour, width=3)
        for x, y in points:
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        d.line((width - right + 12, legend_y + 7, width - right + 36, legend_y + 7), fill=colour, width=3)
        d.text((width - right + 42, legend_y), method, fill="black", font=font)
        legend_y += 22
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)


def table(results: Results, methods=ROWS) -> str:
    accuracy, kept, merged, share = results.accuracy, results.kept, results.merged, results.share
    base = accuracy[("none", 1.0)]
    vs = lambda a: f"{100 * a / base:.1f}%" if base else "-"  # noqa: E731  (an untrained model answers nothing)
    rows = ["| method | r | accuracy | vs uncompressed | deciding card's token kept | kept or merged "
            "| card crops' share of kept crop tokens |", "|---|---|---|---|---|---|---|",
            f"| none | 1.0 | {base:.1f}% | {vs(base)} | {kept[('none', 1.0)]:.1f}% | {merged[('none', 1.0)]:.1f}% "
            f"| {share[('none', 1.0)]:.1f}% |",
            f"| thumbnail only | - | {accuracy[('thumbnail', 1.0)]:.1f}% | {vs(accuracy[('thumbnail', 1.0)])} "
            "| - | - | - |"]
    for method in methods:
        for r in RATIOS:
            a = accuracy[(method, r)]
            if (method, r) in results.refused:
                rows.append(f"| {method} | {r} | refused: {results.refused[(method, r)]} | - | - | - | - |")
            elif (method, r) not in results.located and method != "oracle":  # merged in the tower: no grid cell
                rows.append(f"| {method} | {r} | {a:.1f}% | {vs(a)} | - | - | - |")
            else:
                rows.append(f"| {method} | {r} | {a:.1f}% | {vs(a)} | {kept[(method, r)]:.1f}% "
                            f"| {merged[(method, r)]:.1f}% | {share[(method, r)]:.1f}% |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default weights/llava-next-tiny-scenes)")
    p.add_argument("--n", type=int, default=500, help="held-out questions per family (default 500, the synthetic tasks' "
                   "default split; a handful for a smoke run)")
    p.add_argument("--family", choices=(*S.FAMILIES, "both"), default="both",
                   help="card (one card), dense (several cards in one region) or both (default)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of the card family (default examples/compression.png; none with --methods); the dense "
                   "family's gets _dense before the suffix")
    p.add_argument("--methods", type=lambda text: tuple(text.split(",")), default=ROWS, metavar="A,B,...",
                   help="only these rows (comma-separated; default every one: " + ", ".join(ROWS) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the random compressor (default 0)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    unknown = [m for m in args.methods if m not in ROWS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.plot is None and args.methods == ROWS:
        args.plot = ROOT / "examples" / "compression.png"
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there; pass a checkpoint folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    configs = [("none", 1.0), ("thumbnail", 1.0)] + [(m, r) for m in args.methods for r in RATIOS]
    for family in S.FAMILIES if args.family == "both" else (args.family,):
        results = evaluate(args.model, args.n, configs, args.seed, family)
        print(f"{args.n} held-out questions of the {TITLES[family]}, model {args.model}\n")
        print(table(results, args.methods))
        print(f"\n{FASTV_NOTE}. PruMerge+ ignores r (it chooses its own count). The oracle keeps uniform's "
              "crop-token total, all of it in the crops holding cards.\n")
        for score, guidance in results.guidance.items():
            print(guidance_summary(guidance, score) + "\n")
        if args.plot is not None:
            path = args.plot if family == "card" else args.plot.with_name(f"{args.plot.stem}_dense{args.plot.suffix}")
            ran = {c: a for c, a in results.accuracy.items() if c not in results.refused}
            plot(ran, path, TITLES[family].split(":")[0], args.methods)
            print(f"wrote {path}\n")


if __name__ == "__main__":
    main()
