"""GlobalCom2: training-free visual-token compression for LLaVA-NeXT, guided by the thumbnail, and the
methods it is compared with.

Tensors in, tensors out; nothing here imports the model. `globalcom2.methods` is the table of every
method and where it prunes; `globalcom2.compress` the stage's inputs, outputs and methods;
`globalcom2.probes` what a method reads from the vision tower; `globalcom2.scores` the token scores
GlobalCom2 can rank by; `globalcom2.fastv` the decoder-side FastV; `globalcom2.ficoco` FiCoCo-V inside the tower, `globalcom2.ficocol` FiCoCo-L inside the decoder; docs/globalcom2.md the algorithm.
"""

from .compress import SCORE_PROBE, STAGE_METHODS, compress, compress_image, score_of, token_scores
from .methods import DECODER, HELP, METHODS, STAGE, TOWER, Method, method, needs, schedule, tower_schedule
from .probes import FEATURES, hidden_states_needed, tower_probes
from .scores import TOKEN_SCORES
from .stage import Compressed, ImageFeatures

__all__ = ["METHODS", "STAGE_METHODS", "TOWER", "STAGE", "DECODER", "HELP", "Method", "method", "needs", "schedule", "tower_schedule",
           "SCORE_PROBE", "TOKEN_SCORES", "FEATURES", "score_of", "token_scores", "Compressed", "ImageFeatures",
           "compress", "compress_image", "hidden_states_needed", "tower_probes"]
