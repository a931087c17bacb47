"""Draw which visual tokens a compressor keeps for one image, with a model: the command line, and
`kept_picture`, which the demo page calls too. The drawing itself is the stage's
(globalcom2/visualize.py `draw`); this module tiles the image, runs the tower and the compressor.

    python -m minillava.apps.visualize --model DIR_OR_HUB_ID --image PATH --out kept.png [--retention-ratio 0.25]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..compression import compressors, encode, has_cls, needs, place, stage_inputs
from ..eval.files import write_atomic
from ..generate import (DTYPES, RATIO_HELP, USER_ERRORS, default_dtype, fail, load, prefill, prepare, quantize_args, quantize_spec,
                       ratio_arg, seed_arg)
from ..layout import downscaled_size, on_grid, on_tiles
from ..model import Llava
from ..schedule import kept_positions
from ..tokenizer import Tokenizer
from ..trust import ConfigError, load_image
from ..weights import DEFAULT_MODEL, load_model, resolve_model


@dataclass
class Picture:
    image: Image.Image  # the drawing
    before: int  # the image's tokens uncompressed
    after: int  # the image's tokens as the decoder gets them (a decoder-side method: as its last pruned layers see them)


@torch.inference_mode()
def kept_picture(model: Llava, image: Image.Image, compressor: str, ratio: float, seed: int = 0,
                 tokenizer: Tokenizer | None = None, prompt: str | None = None) -> Picture:
    """The picture of what `compressor` keeps of the PIL `image` at retention ratio `ratio`. A decoder-side
    method's (FastV's) choice depends on the question: it needs `tokenizer` and `prompt`, and runs the
    decoder's prefill."""
    import globalcom2
    from globalcom2.layout import area_mask, to_crops
    from globalcom2.visualize import draw

    if place(compressor) == "tower":  # merged tokens stand for several patches each: no cell of theirs to mark
        raise ConfigError(f"{compressor} merges tokens inside the vision tower, so what it keeps has no place on "
                          "the grid to draw; picture another --compressor")
    # side: tokens along a tile, after InternVL's pixel shuffle (2 x 2 patches a token) where there is one
    tile, side, family = model.cfg.vision.image_size, model.cfg.token_side, model.cfg.family_spec
    tiles = model.tile(image)
    # the score map shows the method's token score, or GlobalCom2's on this tower for a method without one
    cls = has_cls(model)
    needs(model, compressor)  # a [CLS] method on a tower without [CLS]: refused in one line, before anything runs
    shown = compressor if compressor in globalcom2.STAGE_METHODS and globalcom2.score_of(compressor, cls) else "globalcom2"
    encoded = encode(model, [tiles], compressor, extra=needs(model, shown))
    features, area, note = stage_inputs(model, encoded)[0], encoded[0].area, ""
    before = model.uncompressed_length(encoded[0])
    if place(compressor) == "decoder":  # the prompt and its schedule exactly as generate makes them (`prepare`)
        tokens = model.image_tokens(encoded[0])
        plan = prepare(model, tokenizer, prompt, tokens, before, compressor, ratio, 1)
        length, stages = plan.embeds.shape[0], plan.schedule
        model.llm.setup_cache(1, length)
        prefill(model, plan.embeds[None], stages)
        start = len(tokenizer.encode_question(prompt)[0])  # the image's first position in the prompt
        kept = kept_positions(model.llm, start, tokens.shape[0])
        if family.tile_by_tile:  # InternVL's sequence: the crops tile by tile, then the thumbnail
            thumb_keep, crop_keep = on_tiles(kept, tiles.grid, side)
        else:
            thumb_keep, crop_keep = on_grid(kept, tiles.grid, area, side, model.cfg.anyres_max)
        valid = area_mask(area, crop_keep.shape, crop_keep.device)
        ratios = (to_crops(crop_keep, tiles.grid, side).sum(1).double().cpu()
                  / to_crops(valid, tiles.grid, side).sum(1).double().cpu().clamp(min=1))  # (C,)
        result, after = globalcom2.Compressed(thumb_keep, crop_keep, ratios), plan.visual_tokens["after"]
        if stages:
            first = stages[0].layer  # the layers before it see every image token
            early = "layer 0" if first == 1 else f"layers 0-{first - 1}"
            note = f"kept for decoder layers {stages[-1].layer}+ ({early} see{'s' if first == 1 else ''} all) for: {prompt}"
        else:  # nothing to prune at this r (SparseVLM at r = 1)
            note = f"every decoder layer sees every image token at r = {ratio:g}"
    else:
        result = globalcom2.compress([features], compressor, ratio, seed=seed)[0]
        after = model.image_tokens(encoded[0], None if compressor == "none" else result).shape[0]
    score = globalcom2.score_of(shown, cls)
    drawing = draw(image, tiles.grid, tiles.size, tile, globalcom2.token_scores(features, shown)[0], result,
                   compressor, ratio, area=area, after=after, seed=seed, note=note,
                   score_label="thumbnail [CLS] score" if score == "cls_logits" else f"thumbnail score: {score}",
                   downscaled=None if family.tile_by_tile else downscaled_size(area, side, model.cfg.anyres_max),
                   tiling=family.tiling)
    return Picture(drawing, before, after)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m minillava.apps.visualize",
        description="Draw which visual tokens a compressor keeps for one image: the thumbnail, its [CLS] "
        "score map, and the high-resolution crops with their retention ratios, as one PNG.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--image", required=True, help="image file or http(s) URL")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--compressor", default="globalcom2", choices=compressors(),
                   help="compression method to picture (default globalcom2; none keeps everything); the score "
                   "map shows the method's token score (NAME-attn: layer -2 [CLS] attention, NAME-sim: similarity "
                   "to the tile's mean, the score of globalcom2 on a tower without [CLS]). Peers: "
                   "fastervlm, visionzip, hired (r = HiRED's token budget rate), prumerge+ (r is ignored: "
                   "PruMerge+ chooses its own count), each also as NAME-paper (the published sequence); "
                   "fastv prunes in the decoder by the question's attention and needs --prompt")
    p.add_argument("--prompt", default=None,
                   help="the question (required for fastv, whose choice depends on it; unused otherwise)")
    p.add_argument("--retention-ratio", type=ratio_arg, default=0.25, metavar="R",
                   help=RATIO_HELP)
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random compressor (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and activations (default: float32 on cpu; on cuda as python -m minillava.generate: "
                   "float16 for a checkpoint saved in float16, else bfloat16 where the GPU has it natively, else float32)")
    quantize_args(p)
    args = p.parse_args(argv)
    args.spec = quantize_spec(p, args)
    if place(args.compressor) == "decoder" and args.prompt is None:
        p.error(f"--compressor {args.compressor} needs --prompt: it prunes inside the decoder, by the question's attention")
    return args


def out_problem(out: Path) -> str | None:
    """Why the picture cannot be written to `out`, or None."""
    if out.is_dir():
        return f"--out {out} is a directory; give a file name such as {out / 'kept.png'}"
    if out.exists() and not out.is_file():  # a FIFO or device: replacing it is not what anyone meant
        return f"--out {out} exists and is not a regular file; give a file name ending in .png"
    if out.suffix.lower() != ".png":
        return f"--out {out}: the picture is a PNG; give a file name ending in .png"
    parent = out.parent
    if not parent.is_dir():
        return f"--out {out}: directory {parent} does not exist; create it first"
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return f"--out {out}: no permission to write there"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("--device cuda was asked for but CUDA is not available here; use --device cpu")
    problem = out_problem(args.out)
    if problem:
        return fail(problem)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else None if device.type == "cuda" else torch.float32
    try:
        image = load_image(args.image)
        if dtype is None:  # generate's rule on CUDA (the checkpoint's dtype, bfloat16 where native); inside
            dtype = default_dtype(resolve_model(args.model), device)  # the try: a bad --model is a one-line error
        tokenizer = None
        if place(args.compressor) == "decoder":  # its choice needs the decoder and the question
            model, tokenizer = load(args.model, device, dtype, quantize=args.spec)
        else:
            model = load_model(resolve_model(args.model), device, dtype, args.spec)  # no tokenizer needed
        picture = kept_picture(model, image, args.compressor, args.retention_ratio, args.seed, tokenizer, args.prompt)
    except USER_ERRORS as e:
        return fail(str(e))
    try:
        buffer = io.BytesIO()
        picture.image.save(buffer, format="PNG")
        write_atomic(args.out, buffer.getvalue())  # a failed write leaves the old file, not half a PNG
    except OSError as e:
        return fail(f"cannot write {args.out}: {e.strerror or e}")
    print(f"wrote {args.out} ({picture.image.width}x{picture.image.height}): {args.compressor}, "
          f"visual tokens {picture.before} -> {picture.after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
