# %% [markdown]
# # Local volume of the digits MLP (Figure 1 estimates)
#
# Stage `estimate_figure1` (params.yaml `estimate_figure1`), the estimates of the paper's Figure 1. Cost: mean KL(p_anchor ‖ p_θ) over the 773 held-out images; neighbourhood: the star domain where it stays below the cutoff (10⁻² nats). Measure: Gaussian N(0, σ²I) centred at the origin, σ = 1/sqrt(5e-4 · 1024) ≈ 1.3975, the training loss's L2 penalty read as a prior as the paper's code did (docs/method.md#prior-scale). Estimates: naive (k = 10,000) and each preconditioner (k = 3,000): the paper's five (Hessian as its code applied it, diag(H), HesScale, Adam μ, Adam ν) and the full Hessian applied correctly, V diag(p) Vᵀ, at three ε (docs/method.md#preconditioners, docs/experiments.md#figure-1, docs/authors-code.md#hessian-mis-application). The Hessian (of the KL at the anchor, float64) is decomposed once and reused. Wall times go to `estimates.timings.json`, outside DVC.
#
# An interrupted run resumes from the per-estimate progress files in `progress_dir`.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/estimate_figure1/
# never over the pipeline's (point an output path elsewhere to change that).
data_dir: str = "data/digits"  # raw inputs (data.dvc)
split_path: str = "results/mlp/split.npz"  # from split_digits
model_dir: str = "results/mlp/model"  # from train_mlp: weights and Adam state
estimates_path: str = "results/scratch/estimate_figure1/estimates.json"  # output: config and all aggregates
samples_path: str = "results/scratch/estimate_figure1/samples.npz"  # output: per-sample terms, radii, costs
spectra_path: str = "results/scratch/estimate_figure1/spectra.npz"  # output: curvature vectors
progress_dir: str = "results/scratch/estimate_figure1/progress"  # resumable progress (not a DVC out)
metrics_path: str = "results/scratch/estimate_figure1/estimate_metrics.json"  # output: headline numbers (DVC metrics)
cutoff: float = 1.0e-2  # nats of mean KL on the held-out images
sigma: float = 1.3975424859373686  # prior std (not variance): 1/sqrt(l2 · n_train)
rtol: float = 1.0e-2  # relative tolerance of the cost at each radius
seed: int = 42  # directions: sample i depends only on (seed, i)
processes: int = 1  # processes on this machine (scale.processes): torchrun ranks, one per GPU or CPU ranks (README.md#many-processes)
n_samples_naive: int = 10000  # k of the naive estimate
n_samples_preconditioned: int = 3000  # k of each preconditioned estimate
batch_size: int = 256  # directions per cost call
exponent: float = 0.5  # p_j ∝ 1/(|s_j|^exponent + eps), unit determinant
preconditioners: dict[str, dict] = {  # name: {kind, eps}; kinds in replication.mlp.estimate.KINDS
    "hessian_paper": {"kind": "hessian_paper", "eps": 0.1},
    "diag_hessian": {"kind": "diag_hessian", "eps": 1.0e-2},
    "hesscale": {"kind": "hesscale", "eps": 1.0e-2},
    "adam_mu": {"kind": "adam_mu", "eps": 1.0e-3},
    "adam_nu": {"kind": "adam_nu", "eps": 1.0e-3},
    "hessian_e1": {"kind": "hessian", "eps": 0.1},
    "hessian_e2": {"kind": "hessian", "eps": 1.0e-2},
    "hessian_e3": {"kind": "hessian", "eps": 1.0e-3},
}
selection: dict = {  # honest ε and exponent choice on pilot directions (n_pilot 0: off)
    "n_pilot": 0,
    "pilot_seed": 43,
    "eps": [1.0e-3, 1.0e-2, 1.0e-1],
    "exponents": [0.25, 0.5],
}

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.mlp import estimate
from replication.scale import run_stage

summary = run_stage(estimate.figure1_stage, P)  # replication.scale

# %%
from replication.sweep import summary_table

summary_table(summary["estimates"], columns=("label",))
