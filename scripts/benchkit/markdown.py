"""bench.md: the machine, the method, the table with its notes, and the theoretical cost."""

from __future__ import annotations

from .fmt import fmt_dict
from .plan import PROMPT_TOKENS
from .row import Row, noise


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def markdown(r: dict, rows: list[Row]) -> str:
    plan = r["plan"]
    m = r["machine"]
    head = "# minillava benchmark" + ("" if plan["representative"] else " (QUICK: small shapes, NOT representative)")
    lines = [head, ""]
    if r.get("interrupted"):
        lines += ["**Interrupted** (Ctrl-C or SIGTERM): only the sections that finished are in the table.", ""]
    lines.append(f"Machine: {m['cpu_model']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} threads, "
                 f"{m['torch_interop_threads']} interop), transformers {m['transformers']}, Python {m['python']}; "
                 f"load average {m['loadavg_1min_at_start']:.2f} at start, {r.get('loadavg_end', float('nan')):.2f} at end. "
                 + _capital(noise(r, *r.get("contention", {})).replace("meanwhile", "during the timed rounds"))
                 + (f" (waited {r['idle_waited_s']:.0f} s for a quiet machine)" if r.get("idle_waited_s") else "")
                 + ".")
    lines.append(f"Models (random weights, float32): {r.get('models', '')}")
    lines.append(f"Method: one warm-up call per side, then sides alternated; medians of {fmt_dict(plan['repeats'])} "
                 "timed calls per side (prefill: that many at the longest prompt, up to 2x more at shorter ones); "
                 "ratios are ratios of medians, the notes give the ratio within each round too.")
    lines.append("")
    lines.append("| # | what | against | ours | theirs | ours / theirs | target | |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for row in rows:
        mark = {True: "pass", False: "**FAIL**", None: "n/a"}[row.passed]
        ratio = "-" if row.ratio is None else f"{row.ratio:.3g}"
        lines.append(f"| {row.key} | {row.what} | {row.against} | {row.ours} | {row.theirs} | {ratio} | {row.target} | {mark} |")
    lines.append("")
    for row in rows:
        if row.note:
            lines.append(f"- {row.key}: {row.note}")
    th = r.get("theory")
    if th:
        lines += ["", "## Theoretical prefill cost, 672 x 672 image (LLM-Viewer's count)", ""]
        lines.append(f"Token counts from our AnyRes + globalcom2 (P = 576, grid 2 x 2); scores: {th['scores_note']}; "
                     f"{th['prompt_note']}.")
        lines.append("")
        lines.append("| model | r | tokens (text + image) | TFLOPs | causal | KV MB (fp16) | paper TFLOPs | paper MB | "
                     "diff TFLOPs | diff KV | T = r x 2880: TFLOPs / MB | tower + projector TFLOPs |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in th["rows"]:
            if "paper_tflops" in t:
                paper = [f"{t['paper_tflops']:g}", f"{t['paper_kv_mb']:g}", f"{t['rel_tflops']:+.1%}", f"{t['rel_kv']:+.1%}"]
            else:
                paper = ["-"] * 4
            lines.append(
                f"| {t['model']} | {t['r']:g} | {t['tokens']} ({PROMPT_TOKENS} + {t['image_tokens']}) | {t['tflops']:.1f} | "
                f"{t['tflops_causal']:.1f} | {t['kv_mb']:.0f} | " + " | ".join(paper) + " | "
                f"{t['tflops_at_paper_tokens']:.1f} / {t['kv_mb_at_paper_tokens']:.0f} | {t['tower_projector_tflops']:.2f} |"
            )
        lines.append("")
        lines += [f"- {line}" for line in th["explanation"]]
        lines += ["", "Methods that prune inside the decoder: the uncompressed image enters the prefill, each layer "
                  "counted at what the method's schedule leaves it (text tokens as above).", "",
                  "| model | method | r | stage layers | image share, last layers | image share, mean over layers | TFLOPs |",
                  "|---|---|---|---|---|---|---|"]
        for t in th["decoder"]:
            lines.append(f"| {t['model']} | {t['method']} | {t['r']:g} | {', '.join(map(str, t['stage_layers']))} | "
                         f"{t['last_share']:.3f} | {t['mean_share']:.3f} | {t['tflops']:.1f} |")
        lines += ["", "Methods that merge inside the vision tower: the tower's layers up to the feature layer counted at "
                  "what the schedule leaves each (5 tiles), and the LLM at the tokens the tiles give.", "",
                  "| model | method | r | image tokens | tower TFLOPs (whole) | LLM TFLOPs |", "|---|---|---|---|---|---|"]
        for t in th.get("tower", []):
            lines.append(f"| {t['model']} | {t['method']} | {t['r']:g} | {t['image_tokens']} | "
                         f"{t['tower_tflops']:.2f} ({t['whole_tower_tflops']:.2f}) | {t['llm_tflops']:.1f} |")
    if "run_s" in r:
        lines += ["", f"Run time: {r['run_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"
