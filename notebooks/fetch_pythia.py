# %% [markdown]
# # Pythia checkpoints (Figures 2, 4, 6)
#
# Stage `fetch_pythia` (params.yaml `fetch_pythia`; docs/experiments.md#pythia). Writes one folder per training step in the hub's layout, `step{N}/` (config.json, model.safetensors, and for the local source the AdamW state `optimizer.pt`), the tokenizer and a manifest recording each step's parameter SHA-256 (two steps with identical weights are an error unless listed in `known_duplicates`).
#
# - `source: hub` (paper profile): `EleutherAI/pythia-31m` at `revision=f"step{N}"` for each step (a local folder of `step{N}/` subfolders also works, offline).
# - `source: local` (default; no hub here): a scaled-down Pythia-architecture GPT-NeoX trained with AdamW (β 0.9/0.95, ε 1e-8, as Pythia) on the standard library's `pydoc_data.topics`, a few topics held out for evaluation. Not EleutherAI's weights.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/fetch_pythia/
# never over the pipeline's (point an output path elsewhere to change that).
checkpoints_dir: str = "results/scratch/fetch_pythia/checkpoints"  # output: step{N}/, tokenizer/, manifest.json
history_path: str = "results/scratch/fetch_pythia/train_history.csv"  # output: training curve (DVC plots)
source: str = "local"  # "local" (train here) or "hub" (from_pretrained at revision step{N})
steps: list[int] = [0, 1, 2, 4, 8, 16, 32, 64, 128]  # checkpoint steps; first 0, last the final one
tokenizer_path: str = "../shared/data/pythia-tokenizer/20B_tokenizer.json"  # GPT-NeoX-20B tokenizer
repo_id: str = "EleutherAI/pythia-31m"  # hub source only (or a local folder of step{N}/)
hidden: int = 64  # local source: model width (Pythia-31M: 256)
layers: int = 2  # local source: layers (Pythia-31M: 6)
heads: int = 4  # local source: attention heads (Pythia-31M: 8)
intermediate: int = 256  # local source: MLP width (Pythia-31M: 1024)
seq_len: int = 64  # local source: training context (tokens)
batch_size: int = 8  # local source: sequences per step
lr: float = 3e-3  # local source: peak AdamW learning rate, cosine to 10 %
warmup: int = 20  # local source: linear warmup steps
weight_decay: float = 0.1  # local source: AdamW weight decay on matrices
betas: list[float] = [0.9, 0.95]  # AdamW betas (Pythia)
adam_eps: float = 1e-8  # AdamW epsilon (Pythia)
grad_clip: float = 1.0  # gradient norm clip (Pythia)
n_heldout: int = 8  # local source: pydoc topics held out for evaluation
seed: int = 0  # local source: initialisation, batches, held-out topics
known_duplicates: list[list[int]] = []  # [a, b] step pairs known to hold identical weights

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.pythia import fetch

manifest = fetch.fetch_stage(**P)

# %%
import pandas as pd

pd.DataFrame(manifest.get("history", []))  # local source: losses at each saved step
