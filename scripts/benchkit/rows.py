"""Rows 1 to 11 of the table, from the measured results (rows 12 and 13: quant_rows.py)."""

from __future__ import annotations

from minillava.config import TextConfig, VisionConfig
from minillava.flops import LlmSpec, prefill_flops, tower_flops

from .fmt import GB, fmt_s
from .plan import PROMPT_TOKENS
from .quant_rows import llamacpp_rows, quant_rows
from .row import Row, join_notes, make_row, noise, paired
from .timing import median


def build_rows(r: dict) -> list[Row]:
    rows = []
    v = r.get("vision")
    if v:
        ours, hf, eager = (median(v["samples"][k]) for k in ("ours", "hf_sdpa", "hf_eager_attn"))
        tiles = v["tiles"]
        vcfg = VisionConfig(**r["plan"]["vision"])
        ours_flops = tower_flops(vcfg, tiles, 1, features_only=True)["tower"]
        hf_flops = tower_flops(vcfg, tiles, 1)["tower"]
        rate = f"ours {ours_flops / 1e12:.2f} TFLOP at {ours_flops / ours / 1e9:.0f} GFLOP/s, transformers {hf_flops / 1e12:.2f} TFLOP at {hf_flops / hf / 1e9:.0f} GFLOP/s"
        best = ""
        if r.get("prefill"):
            mm = median(r["prefill"]["matmul_flops"])
            rate += f" (bare matmul {mm / 1e9:.0f} GFLOP/s)"
            best = (f"floor at the bare matmul's rate: {ours_flops / mm:.2f} s = {ours_flops / mm / eager:.2f} x the eager "
                    "side")
        rows.append(make_row("1", f"vision tower, {tiles} tiles, float32 (features of layer -2)",
                             "transformers CLIPVisionModel (sdpa), hidden_states[-2]", f"{fmt_s(ours)}", f"{fmt_s(hf)}",
                             ours / hf, "<= 1.0",
                             join_notes(f"same weights; max abs diff of the features {v['parity']['features_vs_hf']:.1e}", rate,
                                   paired(v["samples"]["ours"], v["samples"]["hf_sdpa"]), noise(r, "vision"))))
        rows.append(make_row("2", "vision tower + [CLS] scores (one call of ours)",
                             "transformers CLIP, eager attention, output_attentions, [CLS] row of the last layer",
                             f"{fmt_s(ours)}", f"{fmt_s(eager)}", ours / eager, "<= 0.6",
                             join_notes(best, paired(v["samples"]["ours"], v["samples"]["hf_eager_attn"]), noise(r, "vision"))))
    p = r.get("prefill")
    if p:
        for i, t in enumerate(r["plan"]["prefill_lengths"]):
            o, h = median(p["samples"][f"ours_{t}"]), median(p["samples"][f"hf_{t}"])
            comp = ""
            if f"ours_compiled_{t}" in p["samples"]:
                c = median(p["samples"][f"ours_compiled_{t}"])
                comp = (f"ours with --compile (compile_steps' prefill, dynamic=True): {fmt_s(c)} = {c / h:.3g} x transformers"
                        + (f", compiled in {p['compile_s']:.0f} s (apart)" if i == 0 else ""))
            elif p.get("compile_error"):
                comp = f"--compile prefill failed: {p['compile_error']}"
            rows.append(make_row(f"3{'ab'[i] if i < 2 else i}", f"decoder prefill, {t} tokens",
                                 "transformers LlamaForCausalLM, inputs_embeds, logits_to_keep=1", f"{fmt_s(o)}",
                                 f"{fmt_s(h)}", o / h, "<= 1.0",
                                 join_notes("both fill a KV cache and compute the logits of the last position only",
                                       f"max abs diff of the logits {p['parity_logits']:.1e}" if i == 0 else "", comp,
                                       paired(p["samples"][f"ours_{t}"], p["samples"][f"hf_{t}"]), noise(r, "prefill"))))
    d = r.get("decode")
    if d:
        o = d["tokens_timed"] / median(d["samples"]["ours"])
        h = d["tokens_timed"] / median(d["samples"]["hf"])
        comp = (f"compile_steps, compile {d['compile_s']:.1f} s (apart)" if d["compiled"]
                else "EAGER (" + (d["compile_error"] or "compile off") + ")")
        ceiling = median(d["copy_bytes_per_s"]) / d["weight_bytes"]
        extra = f"bandwidth ceiling (weights read at the bare copy's rate): {ceiling:.2f} tok/s = {ceiling / h:.2f} x transformers"
        if "ours_eager" in d["samples"]:
            extra = f"ours eager: {d['tokens_timed'] / median(d['samples']['ours_eager']):.2f} tok/s; " + extra
        rows.append(make_row("4", f"decode tokens/s, batch 1, {comp}",
                             "transformers generate (greedy, DynamicCache)", f"{o:.2f} tok/s", f"{h:.2f} tok/s", o / h,
                             ">= 1.5", f"prompt {r['plan']['decode_prompt']}, {r['plan']['new_tokens']} new tokens "
                             f"(min_new_tokens = max_new_tokens), {d['tokens_timed']} decode steps timed; "
                             f"same greedy ids: {'yes' if d['same_ids'] else 'no'}; "
                             + join_notes(extra, paired(d["samples"]["hf"], d["samples"]["ours"]), noise(r, "decode"))))
    if p:
        t = max(r["plan"]["prefill_lengths"])
        spec = LlmSpec.from_text("bench", TextConfig(**r["plan"]["text"]))
        flops = prefill_flops(spec, t, causal=True)["total"]
        o = flops / median(p["samples"][f"ours_{t}"])
        h = flops / median(p["samples"][f"hf_{t}"])
        mm = median(p["matmul_flops"])
        n = r["plan"]["matmul_n"]
        rows.append(make_row("5", f"prefill FLOP/s, {t} tokens (matmul FLOPs, causal attention)",
                             f"bare torch.matmul {n} x {n} float32, same run", f"{o / 1e9:.0f} GFLOP/s",
                             f"{mm / 1e9:.0f} GFLOP/s", o / mm, ">= 0.6",
                             join_notes(f"{flops / 1e12:.3g} TFLOP per prefill; transformers reaches {h / 1e9:.0f} GFLOP/s"
                                   + (f", ours with --compile {flops / median(p['samples'][f'ours_compiled_{t}']) / 1e9:.0f} GFLOP/s"
                                      if f"ours_compiled_{t}" in p["samples"] else ""),
                                   noise(r, "prefill", "matmul"))))
    if d:
        per_token = median(d["samples"]["ours"]) / d["tokens_timed"]
        o = d["weight_bytes"] / per_token
        c = median(d["copy_bytes_per_s"])
        rows.append(make_row("6", "decode bytes/s (weight bytes read per token / time per token)",
                             f"bare dst.copy_(src) of {r['plan']['copy_bytes'] / 2**30:g} GiB, read + written bytes",
                             f"{o / GB:.1f} GB/s", f"{c / GB:.1f} GB/s", o / c, ">= 0.5",
                             f"{d['weight_bytes'] / GB:.2f} GB of weights per token (blocks, norm, lm_head, one "
                             f"embedding row; the KV cache of {d['cache_length']} positions not counted); copy counts "
                             "2 x size per copy; " + noise(r, "decode", "copy")))
    if p:
        lengths = p["row7_lengths"]
        c, u = median(p["row7"]["r0.25"]), median(p["row7"]["uncompressed"])
        rows.append(make_row("7", "LLM prefill at r = 0.25 / uncompressed, same 672 x 672 image",
                             "itself", f"{fmt_s(c)} ({lengths['r0.25']} tok)", f"{fmt_s(u)} ({lengths['uncompressed']} tok)",
                             c / u, "<= 0.35",
                             join_notes(f"{PROMPT_TOKENS} text tokens + the image's tokens from our AnyRes + globalcom2",
                                   paired(p["row7"]["r0.25"], p["row7"]["uncompressed"]), noise(r, "compressed"))))
    comp = r.get("compressor")
    if comp and v:
        c, t = median(comp["samples"]), median(v["samples"]["ours"])
        rows.append(make_row("8", "compressor time / vision tower time (globalcom2 r = 0.25, grid 2 x 2, D = 4096)",
                             "itself", f"{c * 1e3:.1f} ms", f"{fmt_s(t)}", c / t, "<= 0.02",
                             join_notes(f"scores: {comp['scores_note']}", noise(r, "compress", "vision"))))
    ld = r.get("loading")
    if ld:
        own = ld["own_dtype"]
        if "error" in own:
            rows.append(make_row("9", "peak RSS while loading / checkpoint bytes", "itself", "error", "", None, "<= 1.25",
                                 own["error"]))
        else:
            peak = own["hwm_touch"] - own["rss_before"]
            load_only = own["hwm_load"] - own["rss_before"]
            note = (f"{ld['dtype']} checkpoint, {ld['shards']} shards, transformers layout, loaded in its own dtype in a "
                    f"fresh process in {own['load_s']:.1f} s; peak = VmHWM - RSS before loading, after reading every "
                    f"weight once (mapped file pages count); during load_model alone: {load_only / GB:.2f} GB")
            f32 = ld.get("float32")
            if f32 and "error" not in f32:
                p32 = f32["hwm_touch"] - f32["rss_before"]
                note += (f". Into float32 (no target): peak {p32 / GB:.2f} GB = {p32 / ld['ckpt_bytes']:.2f} x the "
                         f"checkpoint, {p32 / f32['model_bytes']:.2f} x the float32 model, load {f32['load_s']:.1f} s")
            rows.append(make_row("9", "peak RSS while loading / checkpoint bytes", "itself", f"{peak / GB:.2f} GB",
                                 f"{ld['ckpt_bytes'] / GB:.2f} GB", peak / ld["ckpt_bytes"], "<= 1.25", note))
    be = r.get("batch_eval")
    if be:
        sizes = r["plan"]["batch_sizes"]
        qps = {b: be["questions"] / median(be["samples"][f"batch{b}"]) for b in sizes}
        rows.append(make_row("10", f"questions/s, minillava.eval synthetic, --batch-size {sizes[1]} / 1",
                             "itself at --batch-size 1", f"{qps[sizes[1]]:.1f} q/s", f"{qps[sizes[0]]:.1f} q/s",
                             qps[sizes[1]] / qps[sizes[0]], ">= 4",
                             join_notes(f"shipped tiny model, globalcom2 r = 0.25, {be['questions']} questions per side; "
                                   + ", ".join(f"batch {b}: {q:.1f} q/s" for b, q in qps.items())
                                   + f"; same answers at every batch size: {'yes' if be['same_answers'] else 'NO'}",
                                   paired(be["samples"][f"batch{sizes[0]}"], be["samples"][f"batch{sizes[1]}"]),
                                   noise(r, "batch_eval"))))
    bd = r.get("batch_decode")
    if bd:
        one, many = bd["sizes"]
        for key, name in zip(("11a", "11b"), bd["dtypes"]):
            sm = bd["samples"]
            tps = {b: b * bd["steps_timed"] / median(sm[f"{name}_batch{b}"]) for b in bd["sizes"]}
            kernel = many * median(sm[f"{name}_kernels{one}"]) / median(sm[f"{name}_kernels{many}"])
            rows.append(make_row(key, f"decode tokens/s, batch {many} / batch 1 (all rows' tokens), {name}, eager",
                                 "itself at batch 1", f"{tps[many]:.2f} tok/s", f"{tps[one]:.2f} tok/s",
                                 tps[many] / tps[one], ">= 5",
                                 join_notes(f"prompt {r['plan']['decode_prompt']}, {bd['steps_timed']} decode steps timed, "
                                       f"the same prompt in every row; every row's ids equal batch 1's: "
                                       f"{'yes' if bd['same_ids'][name] else 'NO'}",
                                       f"the kernels alone (every linear of a step on {many} rows vs on 1, {name}): "
                                       f"{kernel:.2f}x, the ceiling of this ratio on this CPU",
                                       paired([many * t for t in sm[f"{name}_batch{one}"]], sm[f"{name}_batch{many}"]),
                                       noise(r, "batch_decode"))))
    return rows + quant_rows(r) + llamacpp_rows(r)
