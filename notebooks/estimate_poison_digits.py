# %% [markdown]
# # Local volume of the clean and poisoned digits MLPs
#
# Stage `estimate_poison_digits` (params.yaml `estimate_poison_digits`), beyond the paper: for every network of `train_poison_digits`, the naive estimate and one per preconditioner (diag(H), Adam ν and the full Hessian applied correctly), each at the ε and exponent chosen on pilot directions that no reported estimate reuses (docs/method.md#honest-selection). Cost and prior as Figure 1: mean KL(p_anchor ‖ p_θ) over the 773 held-out images below 10⁻² nats, Gaussian N(0, σ²I) with the same σ for every network; the prior and neighbourhood terms are reported apart (docs/experiments.md#poisoned-digits).
#
# An interrupted run resumes from the progress files in `progress_dir`.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/estimate_poison_digits/
# never over the pipeline's (point an output path elsewhere to change that).
data_dir: str = "data/digits"  # raw inputs (data.dvc)
split_path: str = "results/mlp/split.npz"  # from split_digits
models_dir: str = "results/poison_digits/models"  # from train_poison_digits
estimates_path: str = "results/scratch/estimate_poison_digits/estimates.json"  # output: config, pilots and aggregates
samples_path: str = "results/scratch/estimate_poison_digits/samples.npz"  # output: per-sample terms, radii, costs
progress_dir: str = "results/scratch/estimate_poison_digits/progress"  # resumable progress (not a DVC out)
metrics_path: str = "results/scratch/estimate_poison_digits/estimate_metrics.json"  # output: headline numbers (DVC metrics)
processes: int = 1  # processes on this machine (scale.processes): torchrun ranks (README.md#many-processes)
seeds: list[int] = [0, 1, 2, 3, 4]  # training seeds (train_poison_digits.seeds)
cutoff: float = 1.0e-2  # nats of mean KL on the held-out images
sigma: float = 1.3975424859373686  # prior std (not variance), the same for every network
rtol: float = 1.0e-2  # relative tolerance of the cost at each radius
seed: int = 42  # directions of the reported estimates
pilot_seed: int = 43  # directions of the pilots (must differ from seed)
n_samples: int = 3000  # k of every reported estimate
n_pilot: int = 64  # k0 of each grid point's pilot
batch_size: int = 256  # directions per cost call
preconditioners: dict[str, dict] = {  # name: {kind, eps: grid, exponents: grid}
    "diag_hessian": {"kind": "diag_hessian", "eps": [1.0e-3, 1.0e-2, 1.0e-1], "exponents": [0.25, 0.5]},
    "adam_nu": {"kind": "adam_nu", "eps": [1.0e-4, 1.0e-3, 1.0e-2], "exponents": [0.25, 0.5]},
    "hessian": {"kind": "hessian", "eps": [1.0e-3, 1.0e-2, 1.0e-1], "exponents": [0.25, 0.5]},
}

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.poison_digits import estimate
from replication.scale import run_stage

summary = run_stage(estimate.estimate_stage, P)  # replication.scale

# %%
from replication.sweep import summary_table

summary_table(summary["estimates"], columns=("condition", "training_seed", "label"))
