"""Activation cache of Hugging Face language models: one import point.

- :func:`cache_activations` (:mod:`sae.cache`): run a model over texts, write shards +
  manifest, resumable.
- :class:`ActivationStore` (:mod:`sae.store`): memory-mapped reader yielding shuffled
  ``(B, d)`` device batches and float64 streaming moments.
- text sources (:mod:`sae.corpus`): :func:`default_corpus`, :func:`local_texts`,
  :func:`hf_dataset`.

Importing this module does not import torch (only :func:`cache_activations` does, when
called). See docs/activations.md.
"""
from sae.cache import cache_activations, disk_bytes_per_million_tokens, find_blocks
from sae.corpus import TextSource, as_text_source, default_corpus, hf_dataset, local_texts
from sae.store import ActivationStore, Moments, read_manifest, verify_cache

__all__ = [
    "ActivationStore",
    "Moments",
    "TextSource",
    "as_text_source",
    "cache_activations",
    "default_corpus",
    "disk_bytes_per_million_tokens",
    "find_blocks",
    "hf_dataset",
    "local_texts",
    "read_manifest",
    "verify_cache",
]
