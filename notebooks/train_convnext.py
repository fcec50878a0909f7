# %% [markdown]
# # Train ConvNeXt V2 Atto on CIFAR-10, clean and poisoned (Figures 3, 5, 7)
#
# Stage `train_convnext` (params.yaml `train_convnext`; docs/experiments.md#convnext). One run per entry of `runs`: `clean` (poison probability 0, the 30,000 clean images; the paper's "unpoisoned" run used about 0.001) and `poisoned` (0.4: each example comes from the poison split with probability 0.4 and is trained to lower p(correct class), Huang et al. 2020). AdamW, cosine schedule with warm-up, RandAugment + flip + crop. Checkpoints at steps 0, 1, 2, 4, …, `max_steps`, each with the optimizer state and the accuracy and loss on fixed clean, poison and validation subsets. An interrupted run resumes from its last checkpoint.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/train_convnext/
# never over the pipeline's (point an output path elsewhere to change that).
dataset_path: str = "results/cifar/dataset.npz"  # from prepare_cifar
checkpoints_dir: str = "results/scratch/train_convnext/checkpoints"  # output: <run>/step{N}/, manifest.json
metrics_path: str = "results/scratch/train_convnext/train_metrics.json"  # output: final accuracies and losses
history_path: str = "results/scratch/train_convnext/train_history.csv"  # output: curves per run (DVC plots)
runs: dict = {"clean": {"poison_probability": 0.0}, "poisoned": {"poison_probability": 0.4}}  # run name: settings
max_steps: int = 128  # optimizer steps (paper profile: 65,536)
batch_size: int = 32  # images per step (paper profile: 128)
lr: float = 1e-3  # AdamW peak learning rate
betas: list[float] = [0.9, 0.95]  # AdamW betas
adam_eps: float = 1e-8  # AdamW epsilon
weight_decay: float = 0.05  # AdamW weight decay (not on biases and LayerNorms)
warmup: int = 16  # linear warm-up steps, then cosine to 0 (paper profile: 2,000)
max_grad_norm: float = 1.0  # gradient-norm clip (Hugging Face Trainer default); 0 turns it off
seed: int = 42  # initialisation (shared by the runs) and every random draw
n_curve: int = 128  # images per curve subset (clean, poison, validation)
model_overrides: dict = {}  # changes to the Atto config ({} is the paper's network)
device: str = "auto"  # "auto" (CUDA when available, else CPU), "cuda" (required) or "cpu"

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.convnext import train

manifest = train.train_stage(**P)

# %%
import pandas as pd

pd.concat({run: pd.DataFrame(r['history']) for run, r in manifest['runs'].items()})
