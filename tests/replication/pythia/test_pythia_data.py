"""Pythia text (replication.pythia.data): the tokenizer, real-token counting and the KL over
real tokens only (docs/authors-code.md#script-slips), the pydoc split, and the evaluation
documents."""
import json
from pathlib import Path

import pytest
import torch

import localvol
from replication.pythia import data

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO.parent / "shared" / "data" / "pythia-tokenizer" / "20B_tokenizer.json"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} missing")


@needs_tokenizer
def test_eval_tokens_counted_without_padding_and_kl_averages_real_tokens_only(tiny_model):
    tok = data.load_tokenizer(TOKENIZER)
    assert tok("Hello world")["input_ids"] == [12092, 1533]
    texts = ["Hello world, this is a longer document with more tokens in it.", "Short one.",
             "x " * 100]
    ev = data.tokenize_eval(tok, texts, max_tokens=20)
    lengths = [min(len(tok(t)["input_ids"]), 20) for t in texts]
    assert ev["input_ids"].shape == (3, 20)
    assert ev["n_real_tokens"] == sum(lengths) == int(ev["attention_mask"].sum())
    assert ev["n_padding_tokens"] == 60 - sum(lengths) > 0
    assert ev["attention_mask"][1, : lengths[1]].all() and not ev["attention_mask"][1, lengths[1]:].any()

    # the KL of a perturbed model is the token-weighted mean over the real tokens of each document
    model = tiny_model(vocab=50304)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    theta = theta + 0.05 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1))
    padded = localvol.ExpectedKL(model, ev["input_ids"], batch_size=2,
                                 attention_mask=ev["attention_mask"])(theta[None])
    per_doc = []
    for i, n in enumerate(lengths):
        ids = ev["input_ids"][i : i + 1, :n]
        per_doc.append(float(localvol.ExpectedKL(model, ids)(theta[None])) * n)
    assert float(padded) == pytest.approx(sum(per_doc) / sum(lengths), rel=1e-4)


def test_missing_tokenizer_names_the_params_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_pythia.tokenizer_path"):
        data.load_tokenizer(tmp_path / "nope.json")


def test_local_documents_split_is_seeded_and_disjoint():
    train, held = data.local_documents(3, seed=0)
    again_train, again_held = data.local_documents(3, seed=0)
    assert list(held) == list(again_held) and len(held) == 3
    assert not set(train) & set(held) and len(train) + len(held) == 79
    assert list(data.local_documents(3, seed=1)[1]) != list(held)
    with pytest.raises(ValueError, match="fetch_pythia.n_heldout"):
        data.local_documents(0, seed=0)


def test_windows_are_slices_of_the_stream():
    stream = torch.arange(100)
    x = data.windows(stream, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == (4, 10) and x.dtype == torch.int64
    assert torch.equal(x - x[:, :1], torch.arange(10).expand(4, 10))
    with pytest.raises(ValueError, match="shorter than seq_len"):
        data.windows(stream[:10], 1, 10, torch.Generator())


def test_eval_texts_from_jsonl_and_their_errors(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    assert data.eval_texts(str(path), 2, {}) == ["doc 0", "doc 1"]
    with pytest.raises(ValueError, match="only 3 documents.*pythia_estimate.n_eval_docs"):
        data.eval_texts(str(path), 4, {})
    with pytest.raises(ValueError, match="pythia_estimate.eval_source"):
        data.eval_texts("local", 2, {"source": "hub"})
    held = data.local_documents(2, seed=0)[1]
    assert data.eval_texts("local", 1, {"heldout_topics": sorted(held)}) == [held[sorted(held)[0]]]
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "doc"}) + "\n" + json.dumps({"text": "  \n"}) + "\n")
    with pytest.raises(ValueError, match="line 2: \"text\" is empty.*pythia_estimate.eval_source"):
        data.eval_texts(str(blank), 2, {})
