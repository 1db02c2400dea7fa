"""Helpers for the activation-cache tests: tiny random-weight models and a caching worker.

Run as a script (``python tests/_cache_worker.py MODEL_DIR OUT_DIR N_TEXTS SLEEP``) it
caches ``N_TEXTS`` synthetic texts with ``MODEL_DIR`` into ``OUT_DIR`` — the subprocess
that the SIGKILL/resume test kills and restarts. ``SLEEP`` seconds are spent per text
(inside the text generator) so that a kill lands mid-run.
"""
from __future__ import annotations

import os
import random
import sys
import time

WORDS = ["the", "a", "of", "to", "and", "in", "is", "that", "for", "it", "with", "as", "was", "on", "be", "by", "this", "are", "from", "or", "have", "an", "at", "which", "one", "not", "but", "all", "they", "we", "can", "were", "there", "more", "if", "when", "their", "has", "been", "would", "will", "model", "layer", "token", "atom", "sparse", "feature", "vector", "matrix", "rank", "signal", "noise", "error", "gradient", "step", "rate", "loss", "norm", "basis", "dictionary", "residual", "stream", "attention", "head", "block", "weight", "bias", "python", "module", "function", "class", "method", "return", "value", "list", "string", "number", "file", "path", "data", "river", "mountain", "city", "music", "colour", "garden", "winter", "summer", "ocean", "forest", "light", "shadow", "quickly", "slowly", "under", "over", "between", "before", "after", "during", "while", "because", "although"]


def synthetic_texts(n: int, seed: int = 0, sleep: float = 0.0):
    """``n`` deterministic texts of 3–40 words (a generator; ``sleep`` s per text)."""
    rng = random.Random(seed)
    for _ in range(n):
        if sleep:
            time.sleep(sleep)
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))


def make_tokenizer(out_dir: str, kind: str):
    """A WordLevel tokenizer over WORDS saved to ``out_dir``.

    kind ``"bos"``: adds ``<bos>`` in front of every text (Llama/Gemma style);
    kind ``"gpt2"``: adds nothing, ``<|endoftext|>`` is bos = eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":
        specials = ["<|endoftext|>", "<unk>"]
    else:
        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "gpt2":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", unk_token="<unk>")
    else:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(out_dir)
    return tok


def make_tiny_model(out_dir: str, arch: str, n_layers: int = 3, seed: int = 0) -> str:
    """Save a tiny random-weight causal LM (``arch`` in gpt2/llama/gemma2) + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig

    tok = make_tokenizer(out_dir, "gpt2" if arch == "gpt2" else "bos")
    V = len(tok)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, vocab_size=V, n_positions=128,
                         bos_token_id=0, eos_token_id=0)
    elif arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                          max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    elif arch == "gemma2":
        cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           vocab_size=V, max_position_embeddings=128, sliding_window=8,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random weights at a larger scale: non-trivial activations
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return out_dir


def run_cache(model_dir: str, out_dir: str, n_texts: int, sleep: float = 0.0) -> dict:
    """The caching run of the SIGKILL test (one torch thread, as in the subprocess)."""
    import torch

    from sae.cache import cache_activations

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cache_activations(model_dir, synthetic_texts(n_texts, seed=1, sleep=sleep),
                                 out_dir, layers=[0, 2], context_length=24, batch_size=4,
                                 dtype="float32", tokens_per_shard=64, progress=False)
    finally:
        torch.set_num_threads(n)


def main(argv):
    model_dir, out_dir, n_texts, sleep = argv[1], argv[2], int(argv[3]), float(argv[4])
    m = run_cache(model_dir, out_dir, n_texts, sleep)
    print(f"DONE shards={len(m['shards'])} tokens={m['n_tokens']} runs={len(m['runs'])}",
          flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv)
