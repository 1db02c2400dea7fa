# --- SAE model / training / metrics / io (issue 4) ---
from . import io, metrics  # noqa: E402,F401
from .model import JumpReLUSAE, TopKSAE, decode, encode, jumprelu, reconstruct, step  # noqa: E402,F401
from . import train  # noqa: E402,F401  (callable module: sae.train(data, config, ...))
from .train import HParams, NonFiniteError, TrainConfig, TrainResult, make_mesh, sweep  # noqa: E402,F401,E501
# --- activation cache (issue 5); these imports do not import torch/transformers ---
from .activations import ActivationStore, Moments, cache_activations, default_corpus  # noqa: E402,F401
# --- atoms analysis (issue 6): AIP, coherence/uniqueness/q*, R², RIP, ℓ1 recoverability ---
from . import atoms  # noqa: E402,F401
from .atoms import aip_from_moment, second_moment, unit_metrics, whiten  # noqa: E402,F401
# models (embedded SmolLM2-135M / MiniLM loader) and splice evals; neither imports torch here
from . import evals, models  # noqa: E402,F401
