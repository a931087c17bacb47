"""Rows 12a-d and 13 of the table (weight-only int8 / int4) and 14a-c (llama.cpp at the same weight widths),
from the measured results."""

from __future__ import annotations

from .fmt import GB
from .llamacpp import PAIRS
from .quant import QUANT_SIDES
from .row import Row, join_notes, make_row, noise, paired
from .timing import median


def quant_rows(r: dict) -> list[Row]:
    """Rows 12a-d (int8 / int4 decode against our bfloat16 and against their bytes-read ceilings) and 13."""
    rows, q = [], r.get("quant")
    if q:
        tps = {name: q["tokens_timed"] / median(q["samples"][name]) for name in QUANT_SIDES}
        bw = median(q["copy_bytes_per_s"])
        ceiling = {name: bw / q["bytes"][name] for name in QUANT_SIDES}
        kern = {name: median(k["s"]) for name, k in q["kernels"].items()}
        # tok/s if a step cost only its weights' reading at the kernel's own rate (bytes / s of one matrix)
        kernel_bound = {name: q["kernels"][name]["bytes"] / kern[name] / q["bytes"][name] for name in QUANT_SIDES}
        common = join_notes(
            "eager steps, batch 1, prompt " + str(r["plan"]["decode_prompt"]) + f", {q['tokens_timed']} steps timed",
            ", ".join(f"{name} {tps[name]:.2f} tok/s ({q['bytes'][name] / GB:.2f} GB per step, ceiling "
                      f"{ceiling[name]:.2f}, kernel-bound {kernel_bound[name]:.2f})" for name in QUANT_SIDES),
            "kernel alone, one " + f"{r['plan']['text']['intermediate_size']} x {r['plan']['text']['hidden_size']} "
            "matrix, one row: " + ", ".join(f"{name} {kern[name] * 1e3:.3f} ms" for name in QUANT_SIDES),
            "greedy ids equal to float32's: " + ", ".join(f"{name} {q['ids_equal_float32'][name]}/{q['ids_total']}"
                                                         for name in QUANT_SIDES[1:]),
            noise(r, "quant", "copy"))
        for key, name, target in (("12a", "int8", ">= 1.8"), ("12b", "int4", ">= 3")):
            rows.append(make_row(key, f"decode tokens/s, batch 1, {name} / our bfloat16", "our bfloat16, same run",
                                 f"{tps[name]:.2f} tok/s", f"{tps['bfloat16']:.2f} tok/s", tps[name] / tps["bfloat16"],
                                 target, join_notes(f"kernels alone allow {kern['bfloat16'] / kern[name]:.2f}x; float32 "
                                               f"{tps['float32']:.2f} tok/s",
                                               paired(q["samples"]["bfloat16"], q["samples"][name]), common)))
        for key, name in (("12c", "int8"), ("12d", "int4")):
            rows.append(make_row(key, f"decode tokens/s, {name} / its bytes-read ceiling",
                                 "copy bandwidth / weight bytes per step", f"{tps[name]:.2f} tok/s",
                                 f"{ceiling[name]:.2f} tok/s", tps[name] / ceiling[name], ">= 0.8",
                                 join_notes(f"the kernel alone reaches {kernel_bound[name] / ceiling[name]:.2f} of the ceiling "
                                       f"(bfloat16 {tps['bfloat16'] / ceiling['bfloat16']:.2f}, its kernel "
                                       f"{kernel_bound['bfloat16'] / ceiling['bfloat16']:.2f})",
                                       f"copy {bw / GB:.1f} GB/s (read + written)", noise(r, "quant", "copy"))))
    ql = r.get("quant_loading")
    if ql:
        w = ql["while_loading"]
        if "error" in w:
            rows.append(make_row("13", "peak RSS while loading with --quantize int4 / int4 checkpoint bytes", "itself",
                                 "error", "", None, "<= 1.3", w["error"]))
        else:
            peak = w["hwm_touch"] - w["rss_before"]
            d = ql["quantized_ckpt"]
            direct = (f"loading the int4 checkpoint itself: peak {(d['hwm_touch'] - d['rss_before']) / GB:.2f} GB in "
                      f"{d['load_s']:.1f} s" if "error" not in d else f"loading the int4 checkpoint: {d['error']}")
            rows.append(make_row("13", "peak RSS while loading with --quantize int4 / int4 checkpoint bytes", "itself",
                                 f"{peak / GB:.2f} GB", f"{ql['int4_bytes'] / GB:.2f} GB", peak / ql["int4_bytes"],
                                 "<= 1.3",
                                 join_notes(f"the float16 checkpoint of row 9 ({ql['ckpt_bytes'] / GB:.2f} GB) loaded into "
                                       f"bfloat16 with int4 linears (group {ql['group_size']}) in a fresh process in "
                                       f"{w['load_s']:.1f} s; peak = VmHWM - RSS before, after reading every weight once",
                                       f"python -m minillava.apps.quantize wrote the int4 checkpoint in {ql['quantize_s']:.1f} s",
                                       direct)))
    return rows


def llamacpp_rows(r: dict) -> list[Row]:
    """Rows 14a-c: our decode tokens/s against llama.cpp's at the same weight width and threads, each side's
    share of its own bytes-read ceiling in the note; one row saying why when llama.cpp was not run."""
    q = r.get("llamacpp")
    if not q:
        return []
    if "missing" in q:
        return [make_row("14", "decode tokens/s against llama.cpp", "llama.cpp", "-", "-", None, ">= 1.0", q["missing"])]
    tps = {name: q["tokens_timed"] / median(s) for name, s in q["samples"].items()}
    bw = median(q["copy_bytes_per_s"])
    share = {name: tps[name] * q["bytes"][name] / bw for name in tps}  # of the ceiling: copy bandwidth / bytes per step
    lg = q["logits_f16"]
    common = join_notes(
        f"eager steps, batch 1, prompt {r['plan']['decode_prompt']}, {q['tokens_timed']} steps timed, {q['threads']} threads, "
        f"llama-cpp-python {q['llama_cpp_version']}",
        f"llama.cpp F16 logits against ours on the F16-rounded weights: max |diff| {lg['max_abs']:.2g} "
        f"({lg['rel']:.2g} of their std), argmax equal at {lg['argmax_equal']}/{lg['positions']} positions",
        f"copy {bw / GB:.1f} GB/s (read + written)", noise(r, "llamacpp", "copy"))
    rows = []
    for key, (ours, kind) in zip("abc", PAIRS.items()):
        theirs = f"llama.cpp {kind}"
        rows.append(make_row(f"14{key}", f"decode tokens/s, batch 1, our {ours} / llama.cpp {kind}",
                             f"llama.cpp {kind}, same weights and threads", f"{tps[ours]:.2f} tok/s",
                             f"{tps[theirs]:.2f} tok/s", tps[ours] / tps[theirs], ">= 1.0",
                             join_notes(f"of the bytes-read ceiling: ours {share[ours]:.2f} ({q['bytes'][ours] / GB:.2f} GB "
                                        f"a step), llama.cpp {share[theirs]:.2f} ({q['bytes'][theirs] / GB:.2f} GB)",
                                        paired(q["samples"][ours], q["samples"][theirs]), common)))
    return rows
