"""Pythia checkpoints (replication.pythia.checkpoints, .fetch), offline and on CPU: step-list
checks, the Pythia-31M shape, the hub loader on saved step{N} folders, and the manifest's
recorded parameter hashes."""
import pytest
import torch

from replication.pythia import checkpoints, fetch
from replication.sweep import parameter_sha256


@pytest.mark.parametrize("steps, match", [
    ([0], "at least two"), ([1, 2], "must be 0"), ([0, 4, 2], "increasing"),
    ([0, 0, 1], "increasing"), ([0, -1], "non-negative"), ([0, 1.5], "integers"),
    ([0, True], "integers"),
])
def test_check_steps_rejects_bad_lists(steps, match):
    with pytest.raises(ValueError, match=match) as err:
        checkpoints.check_steps(steps)
    assert "fetch_pythia.steps" in str(err.value)


def test_check_steps_accepts_the_papers_34_steps():
    assert len(checkpoints.check_steps(checkpoints.PAPER_STEPS)) == 34


def test_pythia_31m_shape_has_the_papers_parameter_count():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**checkpoints.PYTHIA_31M_CONFIG))
    assert sum(p.numel() for p in model.parameters()) == checkpoints.PYTHIA_31M_N_PARAMS == 30_494_720


def test_model_config_names_the_keys_of_a_bad_width():
    with pytest.raises(ValueError, match="fetch_pythia.hidden"):
        checkpoints.model_config(hidden=9, layers=1, heads=2, intermediate=16, max_positions=8)


def test_hub_loader_reads_step_folders_offline(tmp_path, tiny_model):
    repo = tmp_path / "hub"
    models = {s: tiny_model(seed=s) for s in (0, 3)}
    for s, m in models.items():
        m.save_pretrained(repo / f"step{s}")
    manifest = fetch.fetch_hub(tmp_path / "out", repo_id=str(repo), steps=[0, 3],
                               local_files_only=True, progress=False)
    assert manifest["steps"] == [0, 3] and manifest["source"] == "hub"
    for s, m in models.items():
        loaded, state = checkpoints.load_checkpoint(tmp_path / "out", s)
        assert state is None
        assert (tmp_path / "out" / f"step{s}" / "model.safetensors").exists()
        for (n, a), (_, b) in zip(m.named_parameters(), loaded.named_parameters()):
            assert torch.equal(a, b), n
        assert manifest["parameter_sha256"][str(s)] == parameter_sha256(loaded)
    with pytest.raises(OSError):
        fetch.fetch_hub(tmp_path / "out2", repo_id=str(repo), steps=[0, 5], progress=False)


def test_read_manifest_says_to_run_the_fetch_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_pythia"):
        checkpoints.read_manifest(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"source": "web"}, "fetch_pythia.source"), ({"hidden": 0}, "fetch_pythia.hidden"),
    ({"warmup": 0}, "fetch_pythia.warmup"), ({"lr": 0.0}, "fetch_pythia.lr"),
    ({"weight_decay": -0.1}, "fetch_pythia.weight_decay"), ({"grad_clip": 0.0}, "fetch_pythia.grad_clip"),
    ({"betas": [0.9]}, "fetch_pythia.betas"), ({"betas": [0.9, 1.0]}, "fetch_pythia.betas"),
])
def test_fetch_settings_name_the_bad_key(change, match):
    settings = dict(source="local", hidden=8, layers=1, heads=2, intermediate=16, seq_len=16,
                    batch_size=2, lr=1e-3, warmup=1, weight_decay=0.1, betas=[0.9, 0.95],
                    adam_eps=1e-8, grad_clip=1.0)
    with pytest.raises(ValueError, match=match):
        fetch.check_fetch_settings(**{**settings, **change})
