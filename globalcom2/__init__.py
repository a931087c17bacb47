"""GlobalCom2: training-free visual-token compression for LLaVA-NeXT, guided by the thumbnail.

Tensors in, tensors out; nothing here imports the model. See `globalcom2.compress` for the inputs,
the outputs and the methods, `globalcom2.probes` for what a method reads from the vision tower,
`globalcom2.scores` for the token scores GlobalCom2 can rank by, and docs/globalcom2.md for the algorithm.
"""

from .compress import METHODS, SCORES, compress, compress_image, needs, score_of, token_scores
from .probes import FEATURES, hidden_states_needed, tower_probes
from .scores import TOKEN_SCORES
from .stage import Compressed, ImageFeatures

__all__ = ["METHODS", "SCORES", "TOKEN_SCORES", "FEATURES", "needs", "score_of", "token_scores", "Compressed",
           "ImageFeatures", "compress", "compress_image", "hidden_states_needed", "tower_probes"]
