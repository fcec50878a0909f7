"""Fallbacks and errors of the fetch stage's external inputs (replication.pythia.data,
.fetch): an absent fetch_pythia.tokenizer_path falls back to the tokenizer of
fetch_pythia.repo_id and the manifest says so; a step the hub (or a local folder) cannot give
is an OSError naming the params.yaml keys and the step; bad evaluation JSONL names its key."""
import json
import shutil
from pathlib import Path

import pytest
import transformers

from replication.pythia import data, fetch

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO.parent / "shared" / "data" / "pythia-tokenizer" / "20B_tokenizer.json"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} missing")


@needs_tokenizer
def test_present_tokenizer_path_is_used_and_recorded_as_before(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the fallback must not be called")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", no_hub)
    tok, source = data.tokenizer_with_fallback(TOKENIZER, "EleutherAI/pythia-31m")
    assert source == str(TOKENIZER)
    assert tok("Hello world")["input_ids"] == [12092, 1533]


@needs_tokenizer
def test_absent_tokenizer_path_falls_back_to_the_repo_tokenizer(tmp_path, monkeypatch):
    calls = []
    real = data.load_tokenizer(TOKENIZER)

    def from_pretrained(name, *args, **kwargs):
        calls.append(name)
        real.padding_side = "left"  # the loader's settings must be applied again
        return real

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", from_pretrained)
    tok, source = data.tokenizer_with_fallback(tmp_path / "absent.json", "EleutherAI/pythia-31m")
    assert calls == ["EleutherAI/pythia-31m"]
    assert source.startswith("EleutherAI/pythia-31m (fallback: fetch_pythia.tokenizer_path")
    assert tok.padding_side == "right" and tok.eos_token == data.EOS_TOKEN


def test_absent_tokenizer_and_unreachable_repo_name_both_keys(tmp_path, monkeypatch):
    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (test)")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "from_pretrained", offline)
    with pytest.raises(OSError, match=r"fetch_pythia\.tokenizer_path .*absent\.json not found.*"
                       r"fetch_pythia\.repo_id 'EleutherAI/pythia-31m'") as info:
        data.tokenizer_with_fallback(tmp_path / "absent.json", "EleutherAI/pythia-31m")
    assert "couldn't connect" in str(info.value.__cause__)


def fetch_kwargs(hub, tokenizer_path):
    return dict(source="hub", steps=[0, 1], tokenizer_path=str(tokenizer_path), repo_id=str(hub),
                hidden=8, layers=1, heads=2, intermediate=16, seq_len=16, batch_size=2, lr=1e-3,
                warmup=1, weight_decay=0.1, betas=[0.9, 0.95], adam_eps=1e-8, grad_clip=1.0,
                n_heldout=2, seed=0, progress=False, history_path=str(Path(hub).parent / "history.csv"))


@needs_tokenizer
def test_fetch_manifest_records_the_fallback_tokenizer(tmp_path, tiny_model):
    """A local repo folder holding tokenizer.json (the real loader, offline)."""
    hub = tmp_path / "hub"
    tiny_model(seed=0, layers=1).save_pretrained(hub / "step0")
    tiny_model(seed=1, layers=1).save_pretrained(hub / "step1")
    shutil.copy(TOKENIZER, hub / "tokenizer.json")
    out = tmp_path / "checkpoints"
    manifest = fetch.fetch_stage(checkpoints_dir=str(out),
                                 **fetch_kwargs(hub, tmp_path / "absent.json"))
    assert manifest["tokenizer"].startswith(f"{hub} (fallback: fetch_pythia.tokenizer_path")
    assert json.loads((out / "manifest.json").read_text())["tokenizer"] == manifest["tokenizer"]
    assert data.load_tokenizer(out / "tokenizer")("Hello world")["input_ids"] == [12092, 1533]
    # present: recorded as the path, as before the fallback existed
    again = fetch.fetch_stage(checkpoints_dir=str(out), **fetch_kwargs(hub, TOKENIZER))
    assert again["tokenizer"] == str(TOKENIZER)


def test_local_repo_folder_missing_a_step_names_the_key_and_step(tmp_path, tiny_model):
    hub = tmp_path / "hub"
    tiny_model(seed=0, layers=1).save_pretrained(hub / "step0")
    with pytest.raises(OSError, match=r"fetch_pythia\.repo_id: cannot load step 1 from the local "
                       r"folder .*step1/.*fetch_pythia\.source: local") as info:
        fetch.fetch_hub(tmp_path / "out", repo_id=str(hub), steps=[0, 1], progress=False)
    assert isinstance(info.value.__cause__, OSError)


def test_unreachable_hub_names_the_key_and_step(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (test)")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match=r"fetch_pythia\.repo_id: cannot load step 0 from revision "
                       r"step0 of the Hugging Face hub repo 'EleutherAI/pythia-31m'.*couldn't "
                       r"connect.*fetch_pythia\.source: local") as info:
        fetch.fetch_hub(tmp_path / "out", repo_id="EleutherAI/pythia-31m", steps=[0, 1],
                        progress=False)
    assert "couldn't connect" in str(info.value.__cause__)


def test_eval_jsonl_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pythia_estimate\.eval_source"):
        data.eval_texts(str(tmp_path / "absent.jsonl"), 2, {})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: .*\"text\".*pythia_estimate\.eval_source"):
        data.eval_texts(str(bad), 2, {})
    bad.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: \"text\" is a int.*pythia_estimate\.eval_source"):
        data.eval_texts(str(bad), 1, {})
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in "abc"))
    assert data.eval_texts(str(good), 2, {}) == ["a", "b"]
