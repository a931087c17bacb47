"""GlobalCom2: training-free visual-token compression for LLaVA-NeXT, guided by the thumbnail.

Tensors in, tensors out; nothing here imports the model. See `globalcom2.compress` for the inputs,
the outputs and the methods, and GLOBALCOM2.md (the project's specification) for the algorithm.
"""

from .compress import ALL_NEEDS, METHODS, Compressed, ImageFeatures, compress, compress_image, keep_sequence, needs
from .layout import unpad_area

__all__ = ["ALL_NEEDS", "METHODS", "needs", "Compressed", "ImageFeatures", "compress", "compress_image", "keep_sequence",
           "unpad_area"]
