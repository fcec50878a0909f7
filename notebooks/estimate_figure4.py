# %% [markdown]
# # Local volume of Pythia across training (Figure 4 estimates)
#
# Stage `estimate_figure4` (params.yaml `estimate_figure4` and `pythia_estimate`; docs/experiments.md#pythia, docs/authors-code.md#script-slips, docs/authors-code.md#prior-dominated-interpretation). Every checkpoint, naive and Adam ν preconditioned (at step 0 Adam's ν is 0, so the preconditioner is the identity). Cost: mean KL from the checkpoint over the real tokens of the evaluation text (right padding masked; their number is reported). Prior N(0, σ²I) with σ = RMS of the step-0 parameters (computed). Adam ν from the optimizer state (`adam_source`), or a squared-gradient EMA for checkpoints without one. Shared settings: params.yaml `pythia_estimate`. Plotted by `plot_pythia` as aggregates (logsumexp − log k), each split into its prior and neighbourhood terms.
#
# An interrupted run resumes from the per-estimate progress files in `progress_dir`.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/estimate_figure4/
# never over the pipeline's (point an output path elsewhere to change that).
checkpoints_dir: str = "results/pythia/checkpoints"  # from fetch_pythia
estimates_path: str = "results/scratch/estimate_figure4/estimates.json"  # output: config, token counts, aggregates
samples_path: str = "results/scratch/estimate_figure4/samples.npz"  # output: per-sample terms and radii
progress_dir: str = "results/scratch/estimate_figure4/progress"  # resumable progress (not a DVC out)
metrics_path: str = "results/scratch/estimate_figure4/estimate_metrics.json"  # output: aggregates (DVC metrics)
eval_source: str = "local"  # "local" (held-out pydoc topics) or a JSONL path (Pile val.jsonl)
n_eval_docs: int = 2  # evaluation documents (paper: 20)
max_eval_tokens: int = 128  # right-padded, truncated (paper: 1024); KL over real tokens only
data_batch_size: int = 2  # documents per forward pass (memory)
direction_batch_size: int = 8  # directions per cost call (memory)
rtol: float = 1e-2  # relative tolerance of the cost at each radius
seed: int = 0  # directions: sample i depends only on (seed, i)
processes: int = 1  # processes on this machine (scale.processes): torchrun ranks, one per GPU or CPU ranks (README.md#many-processes)
exponent: float = 0.5  # Adam ν preconditioner p ∝ 1/(ν^exponent + ε)
adam_source: str = "optimizer_state"  # "optimizer_state" or "squared_gradients"
raw_checkpoint_dir: str = ""  # GPT-NeoX/DeepSpeed global_step{N}/ folders ("" for none)
sqgrad_batches: int = 10  # squared-gradient EMA: batches of training-like text
sqgrad_batch_size: int = 8  # squared-gradient EMA: sequences per batch
sqgrad_seq_len: int = 64  # squared-gradient EMA: tokens per sequence
sqgrad_beta2: float = 0.95  # squared-gradient EMA decay (Pythia's Adam beta2)
device: str = "auto"  # "auto" (CUDA when available, else CPU), "cuda" (required) or "cpu"
cutoff: float = 1e-2  # nats of mean KL
adam_eps: float = 1e-5  # ε of the Adam ν preconditioner (paper's)
k: int = 4  # samples per checkpoint and series (paper: 100)

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.pythia import estimate
from replication.scale import run_stage

summary = run_stage(estimate.figure4_stage, P)  # replication.scale

# %%
from replication.sweep import summary_table

summary_table(summary["estimates"], ("series", "step"))
