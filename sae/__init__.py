"""sae — JumpReLU-style sparse autoencoders in Flax NNX, trained on cached LLM activations,
and the atoms analysis of Hu et al. ("Towards atoms of large language models").

Modules: model (SAE architectures), config (TrainConfig, recipes, sweeps), step (the pure
train step), loop (``train``: the host loop), data (array / planted sources), checkpoint
(orbax), activations/cache/store (activation cache on disk), metrics, atoms, io.
"""
from . import io, metrics  # noqa: F401
from .model import JumpReLUSAE, TiedJumpReLUSAE, TopKSAE, decode, encode, jumprelu, reconstruct  # noqa: F401,E501
# training: config/recipes (config), pure step (step), host loop (loop), sources (data)
from . import checkpoint, config, data, loop  # noqa: E402,F401
from . import step  # noqa: E402,F401  (the module; the Heaviside step is sae.model.step)
from .config import HParams, TrainConfig, sweep  # noqa: E402,F401
from .data import ArraySource, PlantedSource, planted_dictionary  # noqa: E402,F401
from .loop import NonFiniteError, TrainResult, make_mesh, train  # noqa: E402,F401
# activation cache on disk; these imports do not import torch/transformers ---
from .activations import ActivationStore, Moments, cache_activations, default_corpus  # noqa: E402,F401
# atoms analysis: AIP, coherence/uniqueness/q*, R², RIP, ℓ1 recoverability ---
from . import atoms  # noqa: E402,F401
from .atoms import aip_from_moment, second_moment, unit_metrics, whiten  # noqa: E402,F401
# models (embedded SmolLM2-135M / MiniLM loader) and splice evals; neither imports torch here
from . import evals, models  # noqa: E402,F401
