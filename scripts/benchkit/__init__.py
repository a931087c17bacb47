"""The parts of scripts/bench.py: what it measures, and how it reports what it measured.

scripts/bench.py stays the command (`python scripts/bench.py [--quick]`, which the docs show and tests
load by path): it runs the sections in their order and hands the results to `report.write`. Everything
else is here, one concept a module, measuring apart from reporting: a measuring module returns plain
dicts of samples, and only the reporting modules turn them into rows, text and pictures.

Why "benchkit" and not "bench": a package scripts/bench/ next to scripts/bench.py would win every
`import bench` (in one folder a package comes before a module of the same name), and
scripts/cuda_check.py, scripts/profile_decode.py and tests/test_docs_commands.py import the script so.
Importing this package needs the repository root and scripts/ on sys.path; scripts/bench.py puts them
there.

Measuring:
    plan.py         shapes and repeat counts of one run, and the workload every run shares
    image.py        the synthetic 672 x 672 test picture
    contention.py   how much of the CPU other processes take meanwhile (WATCH); waiting for a quiet machine
    timing.py       medians, sides alternated A, B, A, B, ..., a whole call timed
    machine.py      the machine's facts, a bare matmul's FLOP/s and a bare copy's bytes/s
    tokens.py       visual tokens of one image after globalcom2 at each ratio
    theory.py       theoretical prefill TFLOPs and KV-cache MB next to the paper's (LLM-Viewer's count)
    vision.py       rows 1, 2: the vision tower
    decoders.py     ours and transformers' decoder on the same weights, copies in a dtype, sizes, inputs
    prefill.py      rows 3, 5, 7: prefill
    decode.py       rows 4, 6: decode
    compressor.py   row 8: the compressor
    loading.py      row 9: loading a checkpoint in a fresh process
    batch.py        rows 10, 11: batching
    quant.py        rows 12, 13: weight-only int8 / int4
    llamacpp.py     rows 14a-c: llama.cpp (GGUF F16, Q8_0, Q4_0 of the same decoder) beside ours
Both:
    fmt.py          numbers as text, for the log lines and the report
Reporting:
    row.py          a row of the table, its target check, the helpers of its note
    rows.py         rows 1 to 11 from the results
    quant_rows.py   rows 12, 13 and 14a-c from the results
    markdown.py     bench.md
    plot.py         bench.png
    report.py       one run's rows, bench.md, bench.json and bench.png
"""
