"""Fixtures of the Pythia tests: a tiny GPT-NeoX with Pythia's architecture choices."""
import pytest
import torch

from replication.pythia import checkpoints


@pytest.fixture
def tiny_model():
    """``tiny_model(vocab=64, seed=0, layers=2)``: a float32 GPT-NeoX (hidden 8, 2 heads) in
    eval mode, initialised from ``torch.manual_seed(seed)``."""
    from transformers import GPTNeoXForCausalLM

    def make(vocab: int = 64, seed: int = 0, layers: int = 2):
        torch.manual_seed(seed)
        cfg = checkpoints.model_config(hidden=8, layers=layers, heads=2, intermediate=16,
                                       max_positions=32, vocab_size=vocab)
        return GPTNeoXForCausalLM(cfg).float().eval()

    return make
