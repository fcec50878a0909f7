"""Issue 9 §3: two checkpoint steps holding identical weights are an error naming both steps
(public Pythia revisions have been byte-identical across steps), unless listed as known; and the
estimate stages refuse weights that differ from what the fetch stage recorded."""
import json
from pathlib import Path

import pytest
import torch

from replication.pythia import checkpoints, fetch
from replication.sweep import check_distinct_steps, parameter_sha256

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO.parent / "shared" / "data" / "pythia-tokenizer" / "20B_tokenizer.json"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} missing")


def test_parameter_hash_sees_every_bit_and_the_names(tiny_model):
    a, b = tiny_model(seed=0, layers=1), tiny_model(seed=0, layers=1)
    assert parameter_sha256(a) == parameter_sha256(b)
    with torch.no_grad():
        p = next(b.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(1.0))  # one ulp
    assert parameter_sha256(a) != parameter_sha256(b)


def test_check_distinct_steps_names_both_steps_and_the_key():
    hashes = {"0": "aa", "1": "bb", "2": "aa"}
    with pytest.raises(ValueError, match=r"step 0 and step 2 have identical weights.*\[0, 2\] to fetch_pythia.known_duplicates"):
        check_distinct_steps(hashes, [], key="fetch_pythia.known_duplicates")
    check_distinct_steps(hashes, [[2, 0]], key="fetch_pythia.known_duplicates")  # listed: fine


@needs_tokenizer
def test_fetch_refuses_a_step_holding_another_steps_weights(tmp_path, tiny_model):
    hub = tmp_path / "hub"
    tiny_model(seed=0, layers=1).save_pretrained(hub / "step0")
    tiny_model(seed=1, layers=1).save_pretrained(hub / "step1")
    tiny_model(seed=0, layers=1).save_pretrained(hub / "step2")  # a mislabelled revision: step 0's weights
    kw = dict(source="hub", steps=[0, 1, 2], tokenizer_path=str(TOKENIZER), repo_id=str(hub),
              hidden=8, layers=1, heads=2, intermediate=16, seq_len=16, batch_size=2, lr=1e-3,
              warmup=1, weight_decay=0.1, betas=[0.9, 0.95], adam_eps=1e-8, grad_clip=1.0,
              n_heldout=2, seed=0, progress=False, history_path=str(tmp_path / "history.csv"))
    out = tmp_path / "checkpoints"
    with pytest.raises(ValueError, match="step 0 and step 2 have identical weights"):
        fetch.fetch_stage(checkpoints_dir=str(out), **kw)
    assert not out.exists() and not list(tmp_path.glob(".checkpoints*"))  # nothing half-written

    manifest = fetch.fetch_stage(checkpoints_dir=str(out), known_duplicates=[[0, 2]], **kw)
    assert manifest["known_duplicates"] == [[0, 2]]
    assert manifest["parameter_sha256"]["0"] == manifest["parameter_sha256"]["2"] != manifest["parameter_sha256"]["1"]
    assert json.loads((out / "manifest.json").read_text())["parameter_sha256"] == manifest["parameter_sha256"]
    # the estimate stages accept the listed pair, and refuse it once the list is gone
    checkpoints.check_manifest_hashes(manifest, [0, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 2\] to fetch_pythia.known_duplicates"):
        checkpoints.check_manifest_hashes({**manifest, "known_duplicates": []}, [0, 1, 2])


def test_estimate_refuses_weights_other_than_those_fetched(tmp_path, tiny_model):
    manifest = {"parameter_sha256": {"0": parameter_sha256(tiny_model(seed=0, layers=1))}}
    assert checkpoints.verified_hash(tiny_model(seed=0, layers=1), 0, manifest) == manifest["parameter_sha256"]["0"]
    with pytest.raises(ValueError, match="holds other weights than fetch_pythia recorded"):
        checkpoints.verified_hash(tiny_model(seed=1, layers=1), 0, manifest)
    with pytest.raises(ValueError, match="no parameter hash for step 0"):
        checkpoints.verified_hash(tiny_model(seed=0, layers=1), 0, {})
    with pytest.raises(ValueError, match="no parameter hash for step 1.*fetch_pythia"):
        checkpoints.check_manifest_hashes(manifest, [0, 1])
