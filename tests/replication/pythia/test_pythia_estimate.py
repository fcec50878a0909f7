"""The Pythia estimate stages' units and settings (replication.pythia.estimate, .points): the
record keys of each figure (kept from the single estimate stage they replace: the per-sample
arrays are named after them), the series labels, and the settings errors naming their
params.yaml keys. No model is needed."""
import pytest

from replication.pythia import estimate, points

SHARED = dict(checkpoints_dir="ck", estimates_path="e.json", samples_path="s.npz",
              progress_dir="progress", metrics_path="m.json", eval_source="local", n_eval_docs=2,
              max_eval_tokens=16, data_batch_size=2, direction_batch_size=8, rtol=1e-2, seed=0,
              exponent=0.5, adam_source="optimizer_state", raw_checkpoint_dir="",
              sqgrad_batches=2, sqgrad_batch_size=2, sqgrad_seq_len=16, sqgrad_beta2=0.95)


def test_figure4_units_are_naive_and_adam_at_every_step():
    units = estimate.figure4_units([0, 1, 8], cutoff=1e-2, adam_eps=1e-5, k=4, label="Adam ν")
    assert [u.key for u in units] == ["ckpt_naive_step0", "ckpt_adam_step0", "ckpt_naive_step1",
                                      "ckpt_adam_step1", "ckpt_naive_step8", "ckpt_adam_step8"]
    assert {u.checkpoint for u in units} == {"step0", "step1", "step8"}
    assert [u.series for u in units[:2]] == ["naive", "Adam ν"]
    assert [(u.preconditioner, u.eps) for u in units[:2]] == [("naive", None), ("adam", 1e-5)]
    assert all(u.cutoff == 1e-2 and u.n_samples == 4 and u.meta == {"figure": 4} for u in units)


@pytest.mark.parametrize("squared_gradients", [True, False])
def test_figure2_units_at_the_final_step(squared_gradients):
    units = estimate.figure2_units(128, cutoff=1e-2, adam_eps=1e-5, k=16, label="Adam ν",
                                   squared_gradients=squared_gradients)
    keys = ["hist_naive", "hist_adam"] + ["hist_sqgrad"] * squared_gradients
    assert [u.key for u in units] == keys
    assert {u.checkpoint for u in units} == {"step128"}
    assert units[1].series == "Adam ν, ε=1e-05"
    if squared_gradients:
        assert (units[2].series, units[2].preconditioner) == ("squared-gradient EMA ν, ε=1e-05", "sqgrad")


def test_figure6_units_index_cutoffs_and_adam_eps():
    units = estimate.figure6_units(64, cutoffs=[1e-2, 1.0], adam_eps=[1e-5, 1e-2], k=2,
                                   label="Adam ν")
    assert [u.key for u in units] == ["cutoff_naive_0", "cutoff_adam0_0", "cutoff_adam1_0",
                                      "cutoff_naive_1", "cutoff_adam0_1", "cutoff_adam1_1"]
    assert [(u.cutoff, u.eps) for u in units[3:]] == [(1.0, None), (1.0, 1e-5), (1.0, 1e-2)]
    assert units[2].series == "Adam ν, ε=0.01"


def test_adam_label_says_when_nu_is_the_squared_gradient_approximation():
    assert points.adam_label("optimizer_state") == "Adam ν"
    assert points.adam_label("squared_gradients") == "Adam ν (squared-gradient EMA)"


@pytest.mark.parametrize("change, match", [
    ({"adam_source": "moments"}, "pythia_estimate.adam_source"),
    ({"n_eval_docs": 0}, "pythia_estimate.n_eval_docs"),
    ({"direction_batch_size": 0}, "pythia_estimate.direction_batch_size"),
    ({"sqgrad_seq_len": 2.5}, "pythia_estimate.sqgrad_seq_len"),
    ({"sqgrad_beta2": 1.0}, "pythia_estimate.sqgrad_beta2"),
])
def test_shared_settings_name_the_bad_key(change, match):
    with pytest.raises(ValueError, match=match):
        points.EstimateSettings(**{**SHARED, **change})


def test_settings_config_holds_no_paths():
    config = points.EstimateSettings(**SHARED).config()
    assert "checkpoints_dir" not in config and "progress_dir" not in config
    assert config["eval_source"] == "local" and config["sqgrad_beta2"] == 0.95


@pytest.mark.parametrize("stage, figure, match", [
    (estimate.figure4_stage, dict(cutoff=-1.0, adam_eps=1e-5, k=2), "estimate_figure4.cutoff"),
    (estimate.figure4_stage, dict(cutoff=1e-2, adam_eps=-1.0, k=2), "estimate_figure4.adam_eps"),
    (estimate.figure4_stage, dict(cutoff=1e-2, adam_eps=1e-5, k=0), "estimate_figure4.k"),
    (estimate.figure2_stage, dict(cutoff=1e-2, adam_eps=1e-5, k=0, compare_squared_gradients=True),
     "estimate_figure2.k"),
    (estimate.figure6_stage, dict(cutoffs=[1.0, 1e-2], adam_eps=[1e-5], k=2), "estimate_figure6.cutoffs"),
    (estimate.figure6_stage, dict(cutoffs=[1e-2], adam_eps=[], k=2), "estimate_figure6.adam_eps"),
])
def test_figure_settings_name_the_bad_key_before_anything_is_read(stage, figure, match):
    with pytest.raises(ValueError, match=match):
        stage(**figure, **SHARED)  # checkpoints_dir "ck" does not exist: checked first
