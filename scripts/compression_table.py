"""GlobalCom2 against its ablations and its peers on the synthetic scenes: the paper's table, in miniature.

    python scripts/compression_table.py [--model weights/llava-next-tiny-scenes] [--n 500] [--plot examples/compression.png]

Answers the held-out split of the `synthetic` task (the one `python -m minillava.eval synthetic`
scores without --data) greedily, uncompressed, with the thumbnail alone (crops removed), and with
every compressor at r = 0.5, 0.25, 0.1, and how often each kept the card's token (the one crop token
that shows the digit). Each image goes through the tower and projector once; its
features are then compressed by each method and answered as `minillava.generate.generate` does
(same prompt, same prefill and decode step). Prints a markdown table of accuracy and its ratio to
uncompressed and the card-token column, and saves a PNG plot of accuracy against r (drawn with PIL).
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
from minillava.anyres import tile_image  # noqa: E402
from minillava.eval import synthetic as S  # noqa: E402
from minillava.generate import decode_one_token, load, prefill  # noqa: E402
from minillava.tokenizer import build_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "weights" / "llava-next-tiny-scenes"
RATIOS = (0.5, 0.25, 0.1)
METHODS = tuple(m for m in globalcom2.METHODS if m != "none")  # every compressor, the peers included


@torch.inference_mode()
def greedy(model, tokenizer, tokens: torch.Tensor, question: str, max_new_tokens: int = 8) -> str:
    """The answer to `question` about an image given as its token sequence (T, D), greedy."""
    embeds = model.prompt_embeds(tokenizer.encode_prompt(build_prompt(question)), [tokens])
    length = embeds.shape[1]
    model.llm.setup_cache(1, length + max_new_tokens)
    token = prefill(model, embeds).argmax(-1)
    ids = []
    for step in range(max_new_tokens):
        if token.item() == tokenizer.eos_id:
            break
        ids.append(token.item())
        token = decode_one_token(model, token.view(1, 1), torch.tensor([length + step])).argmax(-1)
    return tokenizer.decode(ids)


def image_tokens(features: globalcom2.ImageFeatures, method: str, ratio: float, seed: int = 0):
    """The image's token sequence, a compressor's or the thumbnail alone ("thumbnail"), and the
    (H, W) map of the crop tokens it keeps (None for the thumbnail)."""
    if method == "thumbnail":
        return features.thumb, None
    out = globalcom2.compress([features], method, ratio, seed=seed)[0]
    return out.tokens, out.crop_keep


@torch.inference_mode()
def evaluate(model_dir: Path, n: int, configs: list[tuple[str, float]], seed: int = 0):
    """On held-out questions 0 .. n-1, per (method, ratio): accuracy in percent (exact match after
    lower-casing and stripping, as the `synthetic` task scores) and the percentage of scenes whose card
    token (the crop token at the card's centre, the one that shows the digit) was kept."""
    model, tokenizer = load(str(model_dir))
    cfg = model.cfg
    correct, kept = {c: 0 for c in configs}, {c: 0 for c in configs}
    for i in tqdm(range(n), desc="held-out", dynamic_ncols=True, file=sys.stderr):
        s = S.sample(S.DEFAULT_SEED, "test", i)
        tiles = tile_image(s.scene.image, cfg.grid_pinpoints, cfg.vision.image_size)
        features = model.encode_images([tiles], globalcom2.ALL_NEEDS)[0]  # the probes of every method
        _, cell = S.card_cells(s.scene.cards[0], s.scene.image.size, cfg.grid_pinpoints, cfg.vision.image_size,
                               cfg.vision.patch_size)
        for method, ratio in configs:
            tokens, keep = image_tokens(features, method, ratio, seed)
            answer = greedy(model, tokenizer, tokens, S.prompt(s.question))
            correct[(method, ratio)] += answer.strip().lower() == s.answer
            kept[(method, ratio)] += keep is not None and bool(keep[cell])
    return {c: 100.0 * k / n for c, k in correct.items()}, {c: 100.0 * k / n for c, k in kept.items()}


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
               (0, 128, 0), (255, 0, 255)]
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


def table(accuracy: dict, kept: dict) -> str:
    base = accuracy[("none", 1.0)]
    rows = ["| method | r | accuracy | vs uncompressed | card token kept |", "|---|---|---|---|---|",
            f"| none | 1.0 | {base:.1f}% | 100.0% | {kept[('none', 1.0)]:.1f}% |",
            f"| thumbnail only | - | {accuracy[('thumbnail', 1.0)]:.1f}% | {100 * accuracy[('thumbnail', 1.0)] / base:.1f}% | - |"]
    for method in METHODS:
        for r in RATIOS:
            a = accuracy[(method, r)]
            rows.append(f"| {method} | {r} | {a:.1f}% | {100 * a / base:.1f}% | {kept[(method, r)]:.1f}% |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (default weights/llava-next-tiny-scenes)")
    p.add_argument("--n", type=int, default=500, help="held-out questions (default 500, the synthetic task's default split)")
    p.add_argument("--plot", type=Path, default=ROOT / "examples" / "compression.png", help="PNG to write (default examples/compression.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random compressor (default 0)")
    args = p.parse_args(argv)
    configs = [("none", 1.0), ("thumbnail", 1.0)] + [(m, r) for m in METHODS for r in RATIOS]
    accuracy, kept = evaluate(args.model, args.n, configs, args.seed)
    print(f"{args.n} held-out questions of the synthetic task, model {args.model}\n")
    print(table(accuracy, kept))
    plot(accuracy, args.plot)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
