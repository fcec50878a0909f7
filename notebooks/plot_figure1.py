# %% [markdown]
# # Figure 1: preconditioners on the digits MLP
#
# Stage `plot_figure1` (params.yaml `plot_figure1`), the paper's Figure 1: per-sample histograms of log10 probability for each estimate of `estimate_figure1`, dashed lines at the aggregates (logsumexp − log k), saved as PNG and PDF in `figures/`, with a CSV and Markdown table of the aggregates, the prior and neighbourhood terms and the caption (docs/experiments.md#figure-1, docs/authors-code.md#hessian-mis-application, docs/authors-code.md#prior-dominated-interpretation).

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/plot_figure1/
# never over the pipeline's (point an output path elsewhere to change that).
estimates_path: str = "results/mlp/figure1/estimates.json"  # from estimate_figure1
samples_path: str = "results/mlp/figure1/samples.npz"  # from estimate_figure1
figure_png: str = "results/scratch/plot_figure1/figure1_mlp.png"  # output
figure_pdf: str = "results/scratch/plot_figure1/figure1_mlp.pdf"  # output
table_csv: str = "results/scratch/plot_figure1/figure1_mlp_aggregates.csv"  # output
table_md: str = "results/scratch/plot_figure1/figure1_mlp_aggregates.md"  # output: table and caption
bins: int = 40  # histogram bins per estimate
dpi: int = 200  # PNG resolution
width: float = 10.0  # inches (legend on the right)
height: float = 4.5  # inches

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.mlp import plot

out = plot.plot_stage(**P)

# %%
print(out["caption"])
out["table"]
