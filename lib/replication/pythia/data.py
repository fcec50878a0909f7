"""Text for the Pythia experiment: the GPT-NeoX-20B tokenizer, the standard library's
``pydoc_data.topics`` as a small corpus (local source), token streams and windows of them, and
the evaluation documents of the KL cost, right-padded with their real tokens counted
(docs/experiments.md#pythia, docs/authors-code.md#script-slips)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["EOS_TOKEN", "load_tokenizer", "tokenizer_with_fallback", "local_documents",
           "token_stream", "windows", "tokenize_eval", "eval_texts", "training_like_stream"]

EOS_TOKEN = "<|endoftext|>"  # id 0


def load_tokenizer(path: str | os.PathLike):
    """The GPT-NeoX-20B tokenizer (Pythia's) from its ``tokenizer.json`` file or a folder saved
    by ``save_pretrained``; eos = ``<|endoftext|>`` (id 0), pad = id 1 (never in real text;
    the mask, not the pad id, says which tokens are real), right padding.

    Raises FileNotFoundError (naming ``fetch_pythia.tokenizer_path``) if ``path`` is missing,
    ValueError if id 0 is not ``<|endoftext|>``."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    elif path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        raise FileNotFoundError(
            f"tokenizer {path} not found: the pipeline expects the GPT-NeoX-20B tokenizer at "
            "../shared/data/pythia-tokenizer/20B_tokenizer.json (beside the clone), or set "
            "fetch_pythia.tokenizer_path")
    return _configure(tok, path)


def _configure(tok, where):
    """Check id 0 is ``<|endoftext|>`` (ValueError naming ``where`` otherwise); set pad = id 1,
    eos, right padding."""
    if tok.convert_ids_to_tokens(0) != EOS_TOKEN:
        raise ValueError(f"{where}: id 0 is not {EOS_TOKEN}: not the GPT-NeoX tokenizer")
    # id 1 is "<|padding|>" in Pythia's hub tokenizer, "<|unk|>" in 20B_tokenizer.json
    tok.pad_token, tok.eos_token = tok.convert_ids_to_tokens(1), EOS_TOKEN
    tok.padding_side = "right"
    return tok


def tokenizer_with_fallback(tokenizer_path: str | os.PathLike, repo_id: str):
    """The tokenizer of the fetch stage and where it came from: :func:`load_tokenizer` of
    ``tokenizer_path`` (``fetch_pythia.tokenizer_path``) when that exists, else, as a fallback,
    ``PreTrainedTokenizerFast.from_pretrained(repo_id)``: the tokenizer files of
    ``fetch_pythia.repo_id`` (the Hugging Face hub, or a local folder holding them).

    Returns (tokenizer, source): ``source`` is ``str(tokenizer_path)`` when the file exists (as
    recorded before the fallback existed), else ``"<repo_id> (fallback: ...)"``.

    Raises OSError naming both keys when the path is absent and the fallback fails too (chained
    with the loader's error); ValueError as :func:`load_tokenizer`."""
    if Path(tokenizer_path).exists():
        return load_tokenizer(tokenizer_path), str(tokenizer_path)
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(repo_id)
    except Exception as err:  # offline, no such repo, no tokenizer files in it
        raise OSError(
            f"fetch_pythia.tokenizer_path {tokenizer_path} not found, and the fallback, the "
            f"tokenizer of fetch_pythia.repo_id {repo_id!r}, could not be loaded ({err}): set "
            "fetch_pythia.tokenizer_path to the GPT-NeoX-20B tokenizer.json (e.g. "
            "../shared/data/pythia-tokenizer/20B_tokenizer.json), or fetch_pythia.repo_id to a "
            "reachable hub repo or a folder with tokenizer.json") from err
    print(f"fetch_pythia.tokenizer_path {tokenizer_path} not found: using the tokenizer of "
          f"fetch_pythia.repo_id {repo_id!r}", file=sys.stderr)
    source = (f"{repo_id} (fallback: fetch_pythia.tokenizer_path {tokenizer_path} not found; "
              "tokenizer files of fetch_pythia.repo_id)")
    return _configure(tok, repo_id), source


def local_documents(n_heldout: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``pydoc_data.topics`` (79 documents of Python reference prose) into (train,
    held-out) dicts topic → text; the held-out topics are ``n_heldout`` drawn with
    ``numpy.random.default_rng(seed)`` from the sorted topic names.

    Raises ValueError (naming ``fetch_pythia.n_heldout``) unless 1 ≤ n_heldout < 79."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    if not 1 <= n_heldout < len(names):
        raise ValueError(f"n_heldout must be in [1, {len(names) - 1}], got {n_heldout} "
                         "(fetch_pythia.n_heldout)")
    order = np.random.default_rng(seed).permutation(len(names))
    held = sorted(names[i] for i in order[:n_heldout])
    train = {n: topics[n] for n in names if n not in held}
    return train, {n: topics[n] for n in held}


def token_stream(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """Concatenate documents, each followed by ``<|endoftext|>``: (T,) int64 token ids."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq_len) int64 random windows of a (T,) token stream, starts drawn from ``gen``.
    Raises ValueError if the stream is not longer than ``seq_len``."""
    if len(stream) <= seq_len:
        raise ValueError(f"token stream ({len(stream)}) shorter than seq_len ({seq_len})")
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
    return stream[starts[:, None] + torch.arange(seq_len)]


def tokenize_eval(tokenizer, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Tokenise evaluation documents together, right-padded to the longest and truncated at
    ``max_tokens`` (as the paper's code: 20 Pile documents, 1,024 tokens).

    Returns {"input_ids": (n, T) int64, "attention_mask": (n, T) int64 (1 = real token),
    "n_real_tokens": int, "n_padding_tokens": int}. The KL averages over real tokens only:
    the paper's "10,926 tokens" were the padding positions (docs/authors-code.md#script-slips).
    Raises ValueError for no documents or a tokenizer that does not pad on the right."""
    if not texts:
        raise ValueError("no evaluation documents")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_tokens,
                    return_tensors="pt")
    mask = enc["attention_mask"].to(torch.int64)
    if tokenizer.padding_side != "right":
        raise ValueError("evaluation text must be right-padded")
    n_real = int(mask.sum())
    return {"input_ids": enc["input_ids"].to(torch.int64), "attention_mask": mask,
            "n_real_tokens": n_real, "n_padding_tokens": int(mask.numel() - n_real)}


def eval_texts(eval_source: str, n_docs: int, manifest: dict) -> list[str]:
    """The first ``n_docs`` evaluation documents: held-out pydoc topics (``"local"``, in the
    manifest's order) or the ``text`` of the first lines of a JSONL file (e.g. The Pile's
    validation set, val.jsonl).

    Raises ValueError (naming ``pythia_estimate.eval_source`` / ``n_eval_docs``) for ``"local"``
    on checkpoints without held-out topics (hub source), a line that is not a JSON object with
    a string ``"text"``, or a file with too few documents; FileNotFoundError (naming
    ``pythia_estimate.eval_source``) for a missing file."""
    if eval_source == "local":
        if "heldout_topics" not in manifest:
            raise ValueError("eval_source 'local' needs checkpoints from the local source "
                             "(held-out topics); give a JSONL path for hub checkpoints "
                             "(pythia_estimate.eval_source)")
        from pydoc_data.topics import topics

        return [topics[t] for t in manifest["heldout_topics"][:n_docs]]
    if not Path(eval_source).is_file():
        raise FileNotFoundError(
            f"{eval_source} not found (pythia_estimate.eval_source): give 'local' or a JSONL file "
            'of {"text": ...} documents such as The Pile\'s val.jsonl')
    texts = []
    with open(eval_source) as f:
        for number, line in enumerate(f, 1):
            if len(texts) == n_docs:
                break
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{eval_source} line {number}: not a JSON object with a \"text\" "
                                 f"field ({err!r}) (pythia_estimate.eval_source)") from err
            if not isinstance(text, str):
                raise ValueError(f"{eval_source} line {number}: \"text\" is a "
                                 f"{type(text).__name__}, not a string (pythia_estimate.eval_source)")
            if not text.strip():
                raise ValueError(f"{eval_source} line {number}: \"text\" is empty: a document "
                                 "without tokens adds nothing to the KL (pythia_estimate.eval_source)")
            texts.append(text)
    if len(texts) < n_docs:
        raise ValueError(f"{eval_source} has only {len(texts)} documents, need {n_docs} "
                         "(pythia_estimate.n_eval_docs)")
    return texts


def training_like_stream(tokenizer, manifest: dict, *, eval_source: str, n_eval_docs: int,
                         n_docs: int) -> torch.Tensor:
    """(T,) int64 token stream of training-like text for the squared-gradient EMA: the local
    source's training topics (the manifest's split), or for hub checkpoints the ``n_docs``
    JSONL documents after the ``n_eval_docs`` evaluation ones.

    Raises ValueError for hub checkpoints with ``eval_source: local``."""
    if "heldout_topics" in manifest:
        n_heldout, seed = len(manifest["heldout_topics"]), int(manifest.get("seed", 0))
        train_docs, _ = local_documents(n_heldout, seed)
        return token_stream(tokenizer, train_docs.values())
    if eval_source == "local":
        raise ValueError("squared gradients on hub checkpoints need a JSONL eval_source "
                         "(pythia_estimate.eval_source)")
    texts = eval_texts(eval_source, n_eval_docs + n_docs, manifest)
    return token_stream(tokenizer, texts[n_eval_docs:])
