# %% [markdown]
# # Figures 2, 4 and 6: Pythia across training
#
# Stage `plot_pythia` (params.yaml `plot_pythia`; docs/experiments.md#pythia, docs/authors-code.md#script-slips, docs/authors-code.md#prior-dominated-interpretation): Figure 2 (histograms at the final checkpoint, dashed aggregates), Figure 4 (aggregate at every checkpoint, and its prior and neighbourhood terms in a second panel), Figure 6 (cutoff sweep with the slope-N/2 line), PNG and PDF in `figures/`, with a CSV and Markdown table of all aggregates (caption and squared-gradient comparison in the Markdown).

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/plot_pythia/
# never over the pipeline's (point an output path elsewhere to change that).
figure2_estimates: str = "results/pythia/figure2/estimates.json"  # from estimate_figure2
figure2_samples: str = "results/pythia/figure2/samples.npz"  # from estimate_figure2
figure4_estimates: str = "results/pythia/figure4/estimates.json"  # from estimate_figure4
figure6_estimates: str = "results/pythia/figure6/estimates.json"  # from estimate_figure6
figure2_png: str = "results/scratch/plot_pythia/figure2_pythia.png"  # output (and .pdf beside it)
figure4_png: str = "results/scratch/plot_pythia/figure4_pythia.png"  # output (and .pdf beside it)
figure6_png: str = "results/scratch/plot_pythia/figure6_pythia.png"  # output (and .pdf beside it)
table_csv: str = "results/scratch/plot_pythia/pythia_aggregates.csv"  # output
table_md: str = "results/scratch/plot_pythia/pythia_aggregates.md"  # output: table, caption, ν comparison
bins: int = 10  # histogram bins (Figure 2)
dpi: int = 200  # PNG resolution

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.pythia import plot

out = plot.plot_stage(**P)

# %%
out["table"]
