"""Preflight (replication.pipeline.preflight): every missing external input of the active
settings is reported at once, each message naming the params.yaml key that fixes it; the network
is never used here (the reachability functions are replaced), and a GPU is never assumed."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from replication.pipeline import apply_profile
from replication.pipeline import preflight
from replication.pipeline.__main__ import main
from replication.pipeline.devices import resolve_device
from replication.pipeline.parameters import load_yaml

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "cifar10-jpeg").is_dir()
                                or not (DATA / "pythia-tokenizer").is_dir(),
                                reason=f"offline data {DATA} missing")


@pytest.fixture
def offline(monkeypatch):
    """No hub, no URL, no GPU; records the hub requests."""
    calls = []

    def hub_branches(repo_id):
        calls.append(repo_id)
        return None, "OfflineModeIsEnabled: offline (test)"

    monkeypatch.setattr(preflight, "hub_branches", hub_branches)
    monkeypatch.setattr(preflight, "url_error", lambda url: "URLError: no network (test)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return calls


def write_tokenizer(path):
    """A minimal tokenizer file the tokenizers library loads (a one-word vocabulary)."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(path))


def base_params(tmp_path):
    """Settings whose inputs all exist (made in tmp_path): local source, local eval text, a
    two-split JPEG copy (empty archives are not checked beyond their first file: folders)."""
    tok = tmp_path / "tokenizer.json"
    write_tokenizer(tok)
    for split in ("train", "test"):
        (tmp_path / "cifar" / split / "airplane").mkdir(parents=True)
    return {
        "fetch_pythia": {"source": "local", "steps": [0, 1, 2, 4], "tokenizer_path": str(tok),
                         "repo_id": "EleutherAI/pythia-31m"},
        "pythia_estimate": {"eval_source": "local", "n_eval_docs": 2, "adam_source":
                            "optimizer_state", "raw_checkpoint_dir": "", "sqgrad_batches": 2,
                            "sqgrad_batch_size": 3, "device": "auto"},
        "estimate_figure2": {"compare_squared_gradients": True},
        "prepare_cifar": {"local_copy": str(tmp_path / "cifar"),
                          "download_root": str(tmp_path / "download")},
        "train_convnext": {"device": "cpu"},
        "convnext_estimate": {"device": "auto"},
    }


def test_present_inputs_pass_without_any_network(tmp_path, offline):
    assert preflight.check_inputs(base_params(tmp_path)) == []
    assert offline == []  # nothing asked of the hub when the local copies are there


def write_step(folder, step, weights=True):
    d = folder / f"step{step}"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    if weights:
        (d / "model.safetensors").write_bytes(b"x")


def test_local_hub_folder_lists_the_missing_steps(tmp_path, offline):
    hub = tmp_path / "hub"
    write_step(hub, 0)
    write_step(hub, 1, weights=False)  # config only
    write_step(hub, 2)
    params = base_params(tmp_path)
    params["fetch_pythia"].update(source="hub", repo_id=str(hub))
    params["pythia_estimate"]["adam_source"] = "squared_gradients"
    params["pythia_estimate"]["eval_source"] = str(write_jsonl(tmp_path / "val.jsonl", 10))
    problems = preflight.check_inputs(params)
    assert len(problems) == 1, problems
    assert problems[0].startswith("fetch_pythia.repo_id: the local folder")
    assert "step1, step4" in problems[0] and "step0" not in problems[0]
    assert offline == []  # a local folder is never looked up on the hub
    write_step(hub, 4)
    shutil.rmtree(hub / "step1")
    write_step(hub, 1)
    assert preflight.check_inputs(params) == []


def test_unreachable_hub_names_repo_id_and_source_in_one_request(tmp_path, offline):
    params = base_params(tmp_path)
    params["fetch_pythia"].update(source="hub", tokenizer_path=str(tmp_path / "absent.json"))
    params["pythia_estimate"].update(adam_source="squared_gradients",
                                     eval_source=str(write_jsonl(tmp_path / "v.jsonl", 8)))
    problems = preflight.check_inputs(params)
    assert [p.split(":")[0] for p in problems] == ["fetch_pythia.repo_id",
                                                   "fetch_pythia.tokenizer_path"]
    assert "cannot reach the Hugging Face hub for 'EleutherAI/pythia-31m'" in problems[0]
    assert "fetch_pythia.source: local" in problems[0]
    assert "the hub tokenizer of fetch_pythia.repo_id" in problems[1]
    assert offline == ["EleutherAI/pythia-31m"]  # one request serves both checks


def test_reachable_hub_lists_missing_revisions(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "hub_branches",
                        lambda repo_id: ({"main", "step0", "step2"}, None))
    params = base_params(tmp_path)
    params["fetch_pythia"].update(source="hub", tokenizer_path=str(tmp_path / "absent.json"))
    params["pythia_estimate"].update(adam_source="squared_gradients",
                                     eval_source=str(write_jsonl(tmp_path / "v.jsonl", 8)))
    problems = preflight.check_inputs(params)
    assert len(problems) == 1  # the hub tokenizer fallback is reachable: no tokenizer problem
    assert problems[0].startswith("fetch_pythia.steps: the hub repo 'EleutherAI/pythia-31m' "
                                  "has no revision step1, step4")


def test_missing_tokenizer_with_a_local_repo_folder(tmp_path, offline):
    params = base_params(tmp_path)
    (tmp_path / "repo").mkdir()
    params["fetch_pythia"].update(tokenizer_path="absent.json", repo_id=str(tmp_path / "repo"))
    problems = preflight.check_inputs(params)
    assert len(problems) == 1 and problems[0].startswith("fetch_pythia.tokenizer_path:")
    (tmp_path / "repo" / "tokenizer.json").write_text("{}")
    assert preflight.check_inputs(params) == []  # the fallback is there


def write_jsonl(path, n, text=True):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}"} if text else {"body": "x"}) + "\n")
    return path


def test_eval_source_needs_enough_documents_with_text(tmp_path, offline):
    params = base_params(tmp_path)
    params["pythia_estimate"]["n_eval_docs"] = 5
    params["pythia_estimate"]["eval_source"] = str(write_jsonl(tmp_path / "few.jsonl", 3))
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("pythia_estimate.eval_source:")
    assert "only 3 documents, need 5" in problem and "pythia_estimate.n_eval_docs" in problem

    params["pythia_estimate"]["eval_source"] = str(write_jsonl(tmp_path / "bad.jsonl", 9, text=False))
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("pythia_estimate.eval_source:") and "line 1" in problem

    params["pythia_estimate"]["eval_source"] = str(tmp_path / "absent.jsonl")
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("pythia_estimate.eval_source:") and "not found" in problem

    params["pythia_estimate"]["eval_source"] = str(write_jsonl(tmp_path / "five.jsonl", 5))
    assert preflight.check_inputs(params) == []


def test_hub_checkpoints_need_jsonl_text_for_squared_gradients_and_no_local_eval(tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setattr(preflight, "hub_branches",
                        lambda repo_id: ({f"step{n}" for n in (0, 1, 2, 4)}, None))
    params = base_params(tmp_path)
    params["fetch_pythia"]["source"] = "hub"
    params["pythia_estimate"].update(adam_source="squared_gradients")
    [problem] = preflight.check_inputs(params)  # eval_source local
    assert problem.startswith("pythia_estimate.eval_source: 'local'")
    # 2 evaluation documents + 2 × 3 squared-gradient ones
    params["pythia_estimate"]["eval_source"] = str(write_jsonl(tmp_path / "v.jsonl", 7))
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("pythia_estimate.eval_source:") and "need 8" in problem
    assert "sqgrad_batches" in problem
    write_jsonl(tmp_path / "v.jsonl", 8)
    assert preflight.check_inputs(params) == []


def test_optimizer_state_on_hub_checkpoints_needs_raw_deepspeed_files(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "hub_branches",
                        lambda repo_id: ({f"step{n}" for n in (0, 1, 2, 4)}, None))
    params = base_params(tmp_path)
    params["fetch_pythia"]["source"] = "hub"
    params["estimate_figure2"]["compare_squared_gradients"] = False
    params["pythia_estimate"]["eval_source"] = str(write_jsonl(tmp_path / "v.jsonl", 2))
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("pythia_estimate.adam_source: optimizer_state")
    assert "pythia_estimate.raw_checkpoint_dir" in problem
    raw = tmp_path / "raw"
    for n in (1, 4):
        (raw / f"global_step{n}").mkdir(parents=True)
        (raw / f"global_step{n}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    params["pythia_estimate"]["raw_checkpoint_dir"] = str(raw)
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("pythia_estimate.raw_checkpoint_dir:") and "for step 2 " in problem


def test_missing_cifar_copy_offline_names_both_keys(tmp_path, offline):
    params = base_params(tmp_path)
    params["prepare_cifar"]["local_copy"] = str(tmp_path / "no-such-copy")
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("prepare_cifar.local_copy:") and "does not exist" in problem
    assert "prepare_cifar.download_root" in problem and "no network (test)" in problem
    params["prepare_cifar"]["local_copy"] = ""
    [problem] = preflight.check_inputs(params)
    assert problem.startswith("prepare_cifar.local_copy is empty")


def test_missing_cifar_copy_is_fine_when_the_download_url_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "url_error", lambda url: None)
    params = base_params(tmp_path)
    params["prepare_cifar"]["local_copy"] = str(tmp_path / "no-such-copy")
    assert preflight.check_inputs(params) == []


def test_incomplete_cifar_copy_names_the_split(tmp_path, offline):
    params = base_params(tmp_path)
    shutil.rmtree(tmp_path / "cifar" / "test")
    (tmp_path / "cifar" / "train" / "zebra").mkdir()
    problems = preflight.check_inputs(params)
    assert len(problems) == 2 and all(p.startswith("prepare_cifar.local_copy:") for p in problems)
    assert "'zebra'" in problems[0] and "neither test.tar.gz nor test/" in problems[1]


@needs_data
def test_shared_cifar_archives_pass_the_quick_look():
    assert preflight._jpeg_split_problem(DATA / "cifar10-jpeg", "train",
                                         ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                          "frog", "horse", "ship", "truck")) is None


def test_cuda_requested_without_a_gpu_names_each_device_key(tmp_path, offline):
    params = base_params(tmp_path)
    for section in preflight.DEVICE_SECTIONS:
        params[section]["device"] = "cuda"
    problems = preflight.check_inputs(params)
    assert [p.split(" ")[0] for p in problems] == [f"{s}.device" for s in preflight.DEVICE_SECTIONS]
    assert all("is 'cuda' but PyTorch sees no CUDA device" in p for p in problems)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", "x.device") == torch.device("cpu")
    assert resolve_device("cpu", "x.device") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"x\.device is 'cuda' but PyTorch sees no CUDA"):
        resolve_device("cuda", "x.device")
    with pytest.raises(ValueError, match=r"x\.device must be one of 'auto', 'cuda', 'cpu', got 'gpu'"):
        resolve_device("gpu", "x.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "x.device") == torch.device("cuda")


def test_cli_exits_1_listing_every_problem(tmp_path, offline, capsys):
    params = base_params(tmp_path)
    params["fetch_pythia"]["source"] = "hub"
    params["prepare_cifar"]["local_copy"] = ""
    params["train_convnext"]["device"] = "cuda"
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(params))  # JSON is YAML
    with pytest.raises(SystemExit) as exit_info:
        main(["preflight", "--params", str(path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "5 problem(s)" in err
    for key in ("fetch_pythia.repo_id", "pythia_estimate.eval_source",
                "pythia_estimate.adam_source", "prepare_cifar.local_copy", "train_convnext.device"):
        assert f"  - {key}" in err


@needs_data
def test_default_params_pass_here_offline_in_seconds():
    """The default profile reads only the local copies: no network, no GPU needed."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "replication.pipeline", "preflight"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "preflight: all external inputs found"
    assert time.perf_counter() - t0 < 30


@needs_data
def test_paper_profile_fails_here_naming_every_key(tmp_path, offline):
    params_yaml = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_yaml)
    apply_profile(REPO / "profiles" / "paper.yaml", params_yaml)
    problems = preflight.check_inputs(load_yaml(params_yaml), root=REPO)
    keys = [p.split(":")[0].split(" ")[0] for p in problems]
    assert keys == ["fetch_pythia.repo_id", "pythia_estimate.eval_source",
                    "prepare_cifar.local_copy", "train_convnext.device",
                    "convnext_estimate.device", "pythia_estimate.device"], problems
    assert "prepare_cifar.download_root" in problems[2]


def test_tokenizer_path_must_be_a_loadable_file(tmp_path, offline):
    params = base_params(tmp_path)
    params["fetch_pythia"]["tokenizer_path"] = str(tmp_path)  # the folder, a natural slip
    [message] = preflight.check_inputs(params)
    assert message.startswith("fetch_pythia.tokenizer_path:") and "is a folder" in message
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not json")
    params["fetch_pythia"]["tokenizer_path"] = str(garbage)
    [message] = preflight.check_inputs(params)
    assert "is not a tokenizer file" in message and "fetch_pythia.tokenizer_path" in message


def test_local_copy_naming_a_file_and_repo_id_naming_a_missing_folder(tmp_path, offline):
    params = base_params(tmp_path)
    archive = tmp_path / "train.tar.gz"
    archive.write_bytes(b"")
    params["prepare_cifar"]["local_copy"] = str(archive)
    params["fetch_pythia"].update(source="hub", repo_id=str(tmp_path / "no-such-folder"))
    params["pythia_estimate"].update(adam_source="squared_gradients")
    problems = preflight.check_inputs(params)
    assert any(m.startswith("prepare_cifar.local_copy:") and "is a file" in m for m in problems)
    assert any(m.startswith("fetch_pythia.repo_id: the local folder") and "does not exist" in m
               for m in problems)
    assert offline == []  # a path is not sent to the hub


def test_settings_that_no_stage_reads_are_named_with_a_suggestion(tmp_path, offline, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  prepare_cifar:\n    cmd: x\n    params:\n      - prepare_cifar.local_copy\n"
        "      - prepare_cifar.download_root\n")
    monkeypatch.chdir(tmp_path)
    params = {"prepare_cifar": {"local_cpy": "x", "download_root": str(tmp_path)},
              "prepare_cifarr": {"seed": 1}}
    problems = preflight.check_inputs(params)
    assert ("prepare_cifar.local_cpy is read by no stage of dvc.yaml (did you mean "
            "prepare_cifar.local_copy?): rename or delete it") in problems
    assert any(m.startswith("params.yaml section 'prepare_cifarr' is read by no stage")
               and "did you mean 'prepare_cifar'" in m for m in problems)


def test_a_notebook_pair_out_of_step_is_reported(tmp_path, offline, monkeypatch):
    """DVC depends on X.py only, so an X.ipynb edited without Jupytext is invisible to
    `dvc status`: the pre-flight check is what stops `make reproduce` on it."""
    import nbformat

    (tmp_path / "notebooks").mkdir()
    for suffix in (".py", ".ipynb"):
        shutil.copy(REPO / "notebooks" / f"split_digits{suffix}",
                    tmp_path / "notebooks" / f"split_digits{suffix}")
    monkeypatch.chdir(tmp_path)
    params = base_params(tmp_path)
    assert preflight.check_inputs(params) == []
    nb = nbformat.read(tmp_path / "notebooks" / "split_digits.ipynb", as_version=4)
    nb.cells[-1].source += "\nprint('edited without Jupytext')"
    nbformat.write(nb, tmp_path / "notebooks" / "split_digits.ipynb")
    [message] = preflight.check_inputs(params)
    assert "hold different cells" in message and "jupytext --sync" in message


def test_unreadable_params_file_is_one_line_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("a: [1,\n")
    assert preflight.report(bad) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"preflight: cannot read {bad}: ParserError") and err.count("\n") == 1
    assert preflight.report(tmp_path / "missing.yaml") == 1
    assert "FileNotFoundError" in capsys.readouterr().err
