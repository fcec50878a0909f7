# %% [markdown]
# # CIFAR-10 for the ConvNeXt experiment (Figures 3, 5, 7)
#
# Stage `prepare_cifar` (params.yaml `prepare_cifar`; docs/experiments.md#convnext). Loads CIFAR-10 with `torchvision.datasets.CIFAR10(download=True)` into `download_root`, or, where no download can be made (as on the project's machines), from the local JPEG copy named by `local_copy` (results from it are labelled "JPEG copy"). Splits the 50,000 training images once, seeded, into `n_clean` clean and the rest poison images, and picks the `n_eval` test images of the KL cost. Writes one NPZ.

# %% tags=["parameters"]
# Parameters. `dvc repro` injects this stage's params.yaml keys (dvc.yaml lists them) and its
# paths. Run by hand (JupyterLab: Run All, from any folder), the defaults below apply: the values
# of the committed params.yaml (not of a profile applied since), inputs read from the pipeline's
# results, and outputs written only under
#   results/scratch/prepare_cifar/
# never over the pipeline's (point an output path elsewhere to change that).
dataset_path: str = "results/scratch/prepare_cifar/dataset.npz"  # output: images, labels, split and evaluation indices
local_copy: str = "../shared/data/cifar10-jpeg"  # JPEG trees {train,test}/<class>/NNNN.jpg (.tar.gz); "" for the download
download_root: str = "results/cifar/download"  # torchvision's download folder (used when local_copy is "")
seed: int = 42  # clean/poison split (and the JPEG copy's evaluation order)
n_clean: int = 30000  # clean training images; the other 20,000 are the poison split
n_eval: int = 1024  # test images available to the KL cost

# %%
from replication.pipeline import notebook_setup

P = notebook_setup(globals())  # checks the parameters above; runs from the repository root

# %%
from replication.convnext import data

summary = data.prepare_stage(**P)

# %%
summary
