"""`globalcom2-paper` against a loop-by-loop transcription of the authors' published code.

The reference below follows the published `llava_arch.py` (xuyang-liu16/GlobalCom2) step for step:
Python loops over tokens, masks, `argsort`/`topk`, each kept token written back at its index among the
crop's valid tokens, a newline after every grid row. It is deliberately slow and literal; the package
must emit the same sequence, the same crop ratios and the same thumbnail order. Scores are continuous
random values, so exact ties (where `topk`'s order is unspecified) do not occur.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from globalcom2 import ImageFeatures, compress
from minillava.layout import unpad_area


def published_scales(base, gw, gh, r, temperature=10.0):
    n = base.shape[0]
    s = int(n**0.5)
    pw, ph = max(s // gw, 1), max(s // gh, 1)
    acc = np.zeros(gw * gh)
    for idx in range(n):
        i, j = divmod(idx, s)
        acc[min(i // ph, gh - 1) * gw + min(j // pw, gw - 1)] += base[idx].item()
    e = np.exp((acc - np.max(acc)) / temperature)
    p = e / (np.sum(e) + 1e-8)
    return np.clip(r * (1 + p - np.mean(p)), None, 1.0).tolist()


def published_compress(thumb, crops, base, cls, grid, size, newline, r):
    gw, gh = grid
    P, D = thumb.shape
    side = int(P**0.5)
    order = torch.argsort(base, descending=True)[: int(P * r)]
    scales = published_scales(base, gw, gh, r)
    C, Hc, Wc = gw * gh, gh * side, gw * side
    w0, h0 = size
    m = torch.zeros((Hc, Wc), dtype=torch.bool)
    if w0 / h0 > Wc / Hc:
        pad = (Hc - int(h0 * (Wc / w0))) // 2
        m[pad : Hc - pad, :] = True
    else:
        pad = (Wc - int(w0 * (Hc / h0))) // 2
        m[:, pad : Wc - pad] = True
    rows, cols = torch.any(m, 1).nonzero()[:, 0], torch.any(m, 0).nonzero()[:, 0]
    cur_w, cur_h = int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
    m = m.view(gh, side, gw, side).permute(0, 2, 1, 3).contiguous()  # (gh, gw, side, side)
    dims = []
    for i in range(gh):
        for j in range(gw):
            ys, xs = torch.nonzero(m[i, j], as_tuple=True)
            dims.append((0, 0) if len(ys) == 0 else (int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())))
    m = m.view(C, P)
    interp = F.interpolate(base.view(1, 1, side, side), size=(cur_h, cur_w), mode="bilinear", align_corners=False)[0, 0]
    pieces, y0 = [], 0
    for i in range(gh):
        x0 = 0
        for j in range(gw):
            wd, ht = dims[i * gw + j]
            pieces.append(interp[y0 : y0 + ht, x0 : x0 + wd].flatten())
            x0 += wd
        y0 += dims[i * gw][1]
    placed, keep = torch.zeros((C, P, D)), torch.zeros((C, P), dtype=torch.bool)
    for i in range(C):
        feats, local = crops[i][m[i]], cls[i][m[i]]
        score = F.normalize(local[None], dim=-1)[0] + F.normalize(pieces[i][None], dim=-1)[0]
        _, top = torch.topk(score, int(feats.shape[0] * scales[i]))
        for idx in top:  # the paper's accident: an index among valid tokens used as a tile position
            placed[i, idx], keep[i, idx] = feats[idx], True
    placed = placed.view(gh, gw, side, side, D).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (D, Hc, Wc)
    keep = keep.view(gh, gw, side, side).permute(0, 2, 1, 3).reshape(Hc, Wc)
    placed = torch.cat((placed, newline[:, None, None].expand(D, Hc, 1)), -1).flatten(1, 2).T  # (Hc*(Wc+1), D)
    keep = torch.cat((keep, torch.ones((Hc, 1), dtype=torch.bool)), -1).flatten()
    return torch.cat((thumb[order], placed[keep])), scales, order


def features(grid, size, side, seed):
    """Tokens that name themselves ([is_thumb, crop, position]) and random continuous scores."""
    g = torch.Generator().manual_seed(seed)
    gw, gh = grid
    P, C = side * side, gw * gh
    pos = torch.arange(P).float()
    thumb = torch.stack([torch.ones(P), torch.zeros(P), pos], 1)
    crops = torch.stack([torch.stack([torch.zeros(P), torch.full((P,), float(c)), pos], 1) for c in range(C)])
    return ImageFeatures(thumb, crops, torch.randn(P, generator=g) * 3, torch.randn(C, P, generator=g) * 3,
                         grid, size, unpad_area(grid, size, side), torch.tensor([-1.0, -1.0, -1.0]))


GRIDS = [(2, 2), (1, 3), (3, 1), (1, 2), (2, 1), (3, 2)]
SIZES = [(640, 480), (480, 640), (1000, 333), (333, 1000), (800, 799), (1280, 300), (300, 1280)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("side, ratios", [(24, (0.25, 0.1)), (6, (1.0, 0.5, 0.25))])
def test_paper_mode_is_token_for_token_the_published_code(grid, side, ratios):
    for k, size in enumerate(SIZES):
        for r in ratios:
            im = features(grid, size, side, seed=k)
            ours = compress([im], "globalcom2-paper", r)[0]
            ref, scales, thumb_order = published_compress(im.thumb, im.crops, im.thumb_scores, im.crop_scores,
                                                          grid, size, im.newline, r)
            case = f"grid {grid}, size {size}, side {side}, r {r}"
            assert torch.equal(ours.sequence, ref), case  # the -paper method emits its own sequence
            assert np.array_equal(ours.crop_ratio.numpy(), np.array(scales)), case
            assert torch.equal(ours.thumb_keep, thumb_order), case
