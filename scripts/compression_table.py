"""GlobalCom2 against its ablations and its peers on the synthetic scenes: the paper's table, in miniature.

    python scripts/compression_table.py [--model weights/llava-next-tiny-scenes] [--n 500] [--plot examples/compression.png]

Answers the held-out split of the `synthetic` task (the one `python -m minillava.eval synthetic`
scores without --data) greedily, uncompressed, with the thumbnail alone (crops removed), and with
every compressor at r = 0.5, 0.25, 0.1 (the peers included; FastV prunes the uncompressed image in the
decoder's prefill), and how often each kept the card's token (the one crop token that shows the digit),
and how often that token was kept or merged into a kept token (VisionZip's contextual tokens, PruMerge+'s
clusters). Each image goes through the tower and projector once; its features are then compressed by
each method and answered as `minillava.generate.generate` does (same prompt, same prefill and decode
step). Prints a markdown table of accuracy and its ratio to uncompressed and the card-token columns,
and saves a PNG plot of accuracy against r (drawn with PIL). `--n 5` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import globalcom2  # noqa: E402
from globalcom2.visualize import fastv_kept  # noqa: E402
from minillava.anyres import tile_image  # noqa: E402
from minillava.eval import synthetic as S  # noqa: E402
from minillava.generate import FastV, decode_one_token, load, prefill  # noqa: E402
from minillava.tokenizer import build_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "weights" / "llava-next-tiny-scenes"
RATIOS = (0.5, 0.25, 0.1)
METHODS = (*(m for m in globalcom2.METHODS if m != "none"), "fastv")  # every compressor, the peers included
FASTV_NOTE = ("FastV prunes before decoder layer K = 2; the tiny model's decoder has 4 layers, so layers 0-1 "
              "(half the decoder) see every image token and only layers 2-3 the kept ones")


@torch.inference_mode()
def greedy(model, tokenizer, tokens: torch.Tensor, question: str, max_new_tokens: int = 8, fastv_ratio=None):
    """The answer to `question` about an image given as its token sequence (T, D), greedy. With
    `fastv_ratio` r, `tokens` is the uncompressed image and FastV keeps r of it in the prefill; then also
    the indices into `tokens` it kept (else None)."""
    chunks = tokenizer.encode_prompt(build_prompt(question))
    embeds = model.prompt_embeds(chunks, [tokens])
    length = embeds.shape[1]
    fastv = None if fastv_ratio is None else FastV.from_ratio(len(chunks[0]), tokens.shape[0], fastv_ratio)
    model.llm.setup_cache(1, length + max_new_tokens)  # every layer this long: FastV's need fewer slots
    token = prefill(model, embeds, fastv).argmax(-1)
    kept = None if fastv is None else fastv_kept(model.llm, fastv, length)
    ids = []
    for step in range(max_new_tokens):
        if token.item() == tokenizer.eos_id:
            break
        ids.append(token.item())
        token = decode_one_token(model, token.view(1, 1), torch.tensor([length + step])).argmax(-1)
    return tokenizer.decode(ids), kept


def answer(model, tokenizer, features: globalcom2.ImageFeatures, full: globalcom2.Compressed, question: str,
           method: str, ratio: float, seed: int = 0):
    """The answer with one compressor, and what it kept (a `Compressed`; None for the thumbnail alone).
    `full` is the uncompressed packing (`none`), which FastV prunes in the decoder."""
    if method == "thumbnail":
        return greedy(model, tokenizer, features.thumb, question)[0], None
    if method == "fastv":
        text, kept = greedy(model, tokenizer, full.tokens, question, fastv_ratio=ratio)
        return text, globalcom2.keep_sequence(full, kept)
    out = globalcom2.compress([features], method, ratio, seed=seed)[0]
    return greedy(model, tokenizer, out.tokens, question)[0], out


@torch.inference_mode()
def evaluate(model_dir: Path, n: int, configs: list[tuple[str, float]], seed: int = 0):
    """On held-out questions 0 .. n-1, per (method, ratio): accuracy in percent (exact match after
    lower-casing and stripping, as the `synthetic` task scores), the percentage of scenes whose card
    token (the crop token at the card's centre, the one that shows the digit) was kept, and the
    percentage where it was kept or merged into a token that was (`Compressed.crop_merge`)."""
    model, tokenizer = load(str(model_dir))
    cfg = model.cfg
    correct, kept, merged = ({c: 0 for c in configs} for _ in range(3))
    for i in tqdm(range(n), desc="held-out", dynamic_ncols=True, file=sys.stderr):
        s = S.sample(S.DEFAULT_SEED, "test", i)
        tiles = tile_image(s.scene.image, cfg.grid_pinpoints, cfg.vision.image_size)
        features = model.encode_images([tiles], globalcom2.ALL_NEEDS)[0]  # the probes of every method
        full = globalcom2.compress([features], "none")[0]
        _, cell = S.card_cells(s.scene.cards[0], s.scene.image.size, cfg.grid_pinpoints, cfg.vision.image_size,
                               cfg.vision.patch_size)
        for method, ratio in configs:
            text, out = answer(model, tokenizer, features, full, S.prompt(s.question), method, ratio, seed)
            correct[(method, ratio)] += text.strip().lower() == s.answer
            if out is not None:
                into = out.crop_merge is not None and bool(out.crop_merge[cell] >= 0)
                kept[(method, ratio)] += bool(out.crop_keep[cell])
                merged[(method, ratio)] += bool(out.crop_keep[cell]) or into
    percent = lambda counts: {c: 100.0 * k / n for c, k in counts.items()}  # noqa: E731
    return percent(correct), percent(kept), percent(merged)


def plot(accuracy: dict, path: Path):
    """Accuracy against r, one line per method, with the uncompressed and thumbnail-only levels."""
    width, height, left, right, top, bottom = 760, 480, 70, 190, 40, 60
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
    d.text((left, 14), "synthetic scenes: held-out accuracy vs kept visual tokens", fill="black", font=font)
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
    for i, method in enumerate(METHODS):
        colour = colours[i % len(colours)]
        points = [(x_of(r), y_of(accuracy[(method, r)])) for r in RATIOS]
        d.line(points, fill=colour, width=3)
        for x, y in points:
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        d.line((width - right + 12, legend_y + 7, width - right + 36, legend_y + 7), fill=colour, width=3)
        d.text((width - right + 42, legend_y), method, fill="black", font=font)
        legend_y += 22
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)


def table(accuracy: dict, kept: dict, merged: dict) -> str:
    base = accuracy[("none", 1.0)]
    rows = ["| method | r | accuracy | vs uncompressed | card token kept | kept or merged |", "|---|---|---|---|---|---|",
            f"| none | 1.0 | {base:.1f}% | 100.0% | {kept[('none', 1.0)]:.1f}% | {merged[('none', 1.0)]:.1f}% |",
            f"| thumbnail only | - | {accuracy[('thumbnail', 1.0)]:.1f}% | {100 * accuracy[('thumbnail', 1.0)] / base:.1f}% | - | - |"]
    for method in METHODS:
        for r in RATIOS:
            a = accuracy[(method, r)]
            rows.append(f"| {method} | {r} | {a:.1f}% | {100 * a / base:.1f}% | {kept[(method, r)]:.1f}% "
                        f"| {merged[(method, r)]:.1f}% |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default weights/llava-next-tiny-scenes)")
    p.add_argument("--n", type=int, default=500, help="held-out questions (default 500, the synthetic task's default split; "
                   "a handful for a smoke run)")
    p.add_argument("--plot", type=Path, default=ROOT / "examples" / "compression.png", help="PNG to write (default examples/compression.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random compressor (default 0)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be at least 1")
    configs = [("none", 1.0), ("thumbnail", 1.0)] + [(m, r) for m in METHODS for r in RATIOS]
    accuracy, kept, merged = evaluate(args.model, args.n, configs, args.seed)
    print(f"{args.n} held-out questions of the synthetic task, model {args.model}\n")
    print(table(accuracy, kept, merged))
    print(f"\n{FASTV_NOTE}. PruMerge+ ignores r (it chooses its own count).")
    plot(accuracy, args.plot)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
