# %% [markdown]
# # Digits: seeded train / held-out split
#
# Stage `split_digits` (params.yaml `split_digits`), the first step towards Figure 1. Input: the UCI handwritten digits (Alpaydin & Kaynak 1998) as bundled with scikit-learn, `data/digits/digits.csv.gz` (1,797 images of 8×8 pixels, values 0-16, divided by 16 on loading), tracked by `data.dvc`. Output: the indices of one seeded permutation, the first 1,024 for training and the remaining 773 held out (docs/experiments.md#figure-1).

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/split_digits/
# never over the pipeline's (point an output path elsewhere to change that).
data_dir: str = "data/digits"  # raw inputs (data.dvc)
split_path: str = "results/scratch/split_digits/split.npz"  # output: train_idx, heldout_idx (int64)
seed: int = 0  # numpy default_rng(seed).permutation(1797)
n_train: int = 1024  # the first n_train images of the permutation train; the rest are held out

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.mlp import data

summary = data.split_stage(**P)

# %%
import pandas as pd

pd.DataFrame(summary["class_counts"]).rename_axis("digit").T  # images per class and split
