# %% [markdown]
# # Clean vs poisoned digits MLPs: figure, table and verdicts
#
# Stage `plot_poison_digits` (params.yaml `plot_poison_digits`), beyond the paper: per estimator, the log10 volume and neighbourhood term of every network (points) and each condition's mean, with the accuracies and the prior term; a table of means, seed-to-seed spreads, the difference and an exact permutation test, and a plain verdict per estimator: are the poisoned networks' volumes smaller than the clean ones beyond the spread between seeds, and is the gap in the prior or the neighbourhood term (docs/experiments.md#poisoned-digits, docs/claims.md).

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/plot_poison_digits/
# never over the pipeline's (point an output path elsewhere to change that).
estimates_path: str = "results/poison_digits/estimates.json"  # from estimate_poison_digits
train_metrics_path: str = "results/poison_digits/train_metrics.json"  # from train_poison_digits
figure_png: str = "results/scratch/plot_poison_digits/poison_digits.png"  # output
figure_pdf: str = "results/scratch/plot_poison_digits/poison_digits.pdf"  # output
table_csv: str = "results/scratch/plot_poison_digits/poison_digits.csv"  # output: the comparison
table_md: str = "results/scratch/plot_poison_digits/poison_digits.md"  # output: verdicts and tables
dpi: int = 200  # PNG resolution
width: float = 13.0  # inches
height: float = 6.0  # inches

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.poison_digits import plot

table = plot.plot_stage(**P)

# %%
table
