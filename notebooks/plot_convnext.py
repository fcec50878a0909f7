# %% [markdown]
# # Figures 3, 5 and 7: clean and poisoned ConvNeXt V2 Atto
#
# Stage `plot_convnext` (params.yaml `plot_convnext`; docs/experiments.md#convnext, docs/authors-code.md#script-slips, docs/authors-code.md#prior-dominated-interpretation). Figure 3: per-sample histograms at the final checkpoint with the aggregates; Figure 5: aggregates across training with the prior/neighbourhood split and the training curves; Figure 7: aggregates across cutoffs with the slope-N/2 line. Writes PNG and PDF into `figures/` and the table of all aggregates (CSV, and Markdown with the caption).

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/plot_convnext/
# never over the pipeline's (point an output path elsewhere to change that).
figure3_estimates: str = "results/convnext/figure3/estimates.json"  # from estimate_figure3
figure3_samples: str = "results/convnext/figure3/samples.npz"  # from estimate_figure3
figure5_estimates: str = "results/convnext/figure5/estimates.json"  # from estimate_figure5
figure7_estimates: str = "results/convnext/figure7/estimates.json"  # from estimate_figure7
figure3_png: str = "results/scratch/plot_convnext/figure3_convnext.png"  # output (PDF beside it)
figure5_png: str = "results/scratch/plot_convnext/figure5_convnext.png"  # output (PDF beside it)
figure7_png: str = "results/scratch/plot_convnext/figure7_convnext.png"  # output (PDF beside it)
table_csv: str = "results/scratch/plot_convnext/convnext_aggregates.csv"  # output: every aggregate
table_md: str = "results/scratch/plot_convnext/convnext_aggregates.md"  # output: the same with the caption
bins: int = 10  # Figure 3 histogram bins
dpi: int = 200  # PNG resolution

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.convnext import plot

out = plot.plot_stage(**P)
print(out['caption'])

# %%
out['table']
