# %% [markdown]
# # Train the digits MLP
#
# Stage `train_mlp` (params.yaml `train_mlp`), the network of Figure 1, as the paper's code did (docs/experiments.md#figure-1): 64 → 64 → 10 MLP with tanh-approximated GELU (4,810 parameters), weights and biases N(0, 1/fan_in); Adam (β 0.9/0.999, ε 1e-8), lr 0.05 with cosine decay to 0 over 25 epochs of batch 64 (400 steps); loss = mean cross-entropy + ½·5e-4·|θ|². Saves the weights, the Adam state (its moments are two of Figure 1's preconditioners), the final train/held-out accuracy and loss (a DVC metrics file) and the per-epoch history.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/train_mlp/
# never over the pipeline's (point an output path elsewhere to change that).
data_dir: str = "data/digits"  # raw inputs (data.dvc)
split_path: str = "results/mlp/split.npz"  # from split_digits
model_dir: str = "results/scratch/train_mlp/model"  # output: model.safetensors, optimizer.pt, model_config.json
history_path: str = "results/scratch/train_mlp/train_history.csv"  # output: per-epoch loss and accuracy
metrics_path: str = "results/scratch/train_mlp/train_metrics.json"  # output: final accuracy and loss (DVC metrics)
seed: int = 0  # initialisation and per-epoch shuffling
hidden: int = 64  # hidden width: 64 gives 4,810 parameters
lr: float = 0.05  # Adam peak learning rate, cosine-decayed to 0 over all steps
epochs: int = 25  # 25 epochs of 1024/64 steps: 400 steps
batch_size: int = 64  # images per step
l2: float = 5.0e-4  # L2 penalty: the loss is mean CE + ½·l2·|θ|² (all parameters)
betas: list[float] = [0.9, 0.999]  # Adam β1, β2
adam_eps: float = 1.0e-8  # Adam ε

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.mlp import model

result = model.train_stage(**P)

# %%
import pandas as pd

pd.DataFrame(result.history)  # per epoch, also in history_path
