"""Apps built on the model: the web page (`demo`), the lmms-eval model (`lmms`), the picture of what a
compressor keeps (`visualize`) and the command that writes a quantized checkpoint (`quantize`).

Each imports the core (`minillava`'s model, loading and generation modules); the core never imports
them. Their heavy dependencies (Gradio, lmms-eval's) are optional extras in pyproject.toml, imported
only by the app that needs them. Run one with `python -m minillava.apps.NAME`.
"""
