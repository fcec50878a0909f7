# %% [markdown]
# # Local volume of the final clean and poisoned ConvNeXt V2 Atto (Figure 3 estimates)
#
# Stage `estimate_figure3` (params.yaml `convnext_estimate`, shared with the other ConvNeXt estimate stages, and `estimate_figure3`; docs/experiments.md#convnext, docs/authors-code.md#numerical-hazards, docs/authors-code.md#prior-dominated-interpretation). For each run, naive and Adam-ν estimates at the final checkpoint, with enough samples for the per-sample histograms; the metrics say whether the poisoned network's volume is smaller. Cost: mean KL from the checkpoint over the first `n_eval` evaluation images, in float32 (float64 below `float64_below`; never the paper's float16, and no TF32 on CUDA). Prior N(0, σ²I) with σ = RMS of the initial parameters (computed). Every estimate stores its aggregate and its prior and neighbourhood terms. An interrupted run resumes from the per-estimate progress files in `progress_dir`.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/estimate_figure3/
# never over the pipeline's (point an output path elsewhere to change that).
dataset_path: str = "results/cifar/dataset.npz"  # from prepare_cifar
checkpoints_dir: str = "results/convnext/checkpoints"  # from train_convnext
estimates_path: str = "results/scratch/estimate_figure3/estimates.json"  # output: config and aggregates
samples_path: str = "results/scratch/estimate_figure3/samples.npz"  # output: per-sample terms and radii
progress_dir: str = "results/scratch/estimate_figure3/progress"  # resumable progress (deleted at the end)
metrics_path: str = "results/scratch/estimate_figure3/estimate_metrics.json"  # output: DVC metrics
n_eval: int = 32  # test images of the KL cost (paper: 1,024)
data_batch_size: int = 64  # images per forward pass (memory)
direction_batch_size: int = 4  # directions per cost call
vectorize: bool = False  # vmap the directions of a call (True on GPU; False is faster on CPU)
rtol: float = 1e-2  # relative tolerance of the cost at each radius
seed: int = 0  # directions: sample i depends only on (seed, i)
processes: int = 1  # processes on this machine (scale.processes): torchrun ranks, one per GPU or CPU ranks (README.md#many-processes)
exponent: float = 0.5  # Adam ν preconditioner p ∝ 1/(ν^exponent + ε)
float64_below: float = 1e-5  # cutoffs below this (nats) use a float64 copy of the network
device: str = "auto"  # "auto" (CUDA when available, else CPU), "cuda" (required) or "cpu"
cutoff: float = 1e-2  # nats of mean KL
adam_eps: float = 1e-5  # ε of the Adam ν preconditioner (the paper's)
k: int = 12  # samples per run and series (paper: 1,000)

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.convnext import estimate
from replication.scale import run_stage

summary = run_stage(estimate.figure3_stage, P)  # replication.scale

# %%
from replication.sweep import summary_table

summary_table(summary["estimates"], ("run", "series", "step", "dtype"))
