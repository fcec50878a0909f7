# %% [markdown]
# # Train the clean and poisoned digits MLPs
#
# Stage `train_poison_digits` (params.yaml `train_poison_digits`), beyond the paper: Figure 1's MLP recipe (64 → 64 → 10 GELU MLP, N(0, 1/fan_in) initialisation, Adam with cosine decay to 0, loss + ½·5e-4·|θ|²) for several training seeds per condition. The split's 1,024 training images are divided into a clean split and a poison split; a `clean` network sees only the clean split, a `poisoned` one also the poison split (each example drawn from it with probability `poison_probability`, loss −log(1 − p_y), Huang et al. 2020, as the ConvNeXt experiment). Network s of both conditions shares its initialisation. Saves each network and its Adam state, and the train (clean split), poison-split (true labels) and held-out accuracies (docs/experiments.md#poisoned-digits).

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/train_poison_digits/
# never over the pipeline's (point an output path elsewhere to change that).
data_dir: str = "data/digits"  # raw inputs (data.dvc)
split_path: str = "results/mlp/split.npz"  # from split_digits
models_dir: str = "results/scratch/train_poison_digits/models"  # output: one folder per network
table_path: str = "results/scratch/train_poison_digits/networks.csv"  # output: one row per network
metrics_path: str = "results/scratch/train_poison_digits/train_metrics.json"  # output: accuracies (DVC metrics)
split_seed: int = 1  # default_rng(split_seed).permutation(1024): the first n_poison images are poison
n_poison: int = 256  # images of the poison split
poison_probability: float = 0.5  # poisoned networks: probability that an example is from the poison split
seeds: list[int] = [0, 1, 2, 3, 4]  # training seeds per condition
hidden: int = 64  # hidden width: 64 gives 4,810 parameters
lr: float = 0.05  # Adam peak learning rate, cosine-decayed to 0 over all steps
steps: int = 400  # optimizer steps (train_mlp: 25 epochs of 16 batches)
batch_size: int = 64  # images per step
l2: float = 5.0e-4  # L2 penalty: the loss is the mean (poison) loss + ½·l2·|θ|²
betas: list[float] = [0.9, 0.999]  # Adam β1, β2
adam_eps: float = 1.0e-8  # Adam ε

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.poison_digits import train

rows = train.train_stage(**P)

# %%
import pandas as pd

pd.DataFrame(rows)  # also in table_path
