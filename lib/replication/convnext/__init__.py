"""ConvNeXt V2 Atto on CIFAR-10, clean and poisoned (paper §4.2, Figures 3, 5, 7;
docs/experiments.md#convnext, docs/authors-code.md#radius-search,
docs/authors-code.md#numerical-hazards, docs/authors-code.md#script-slips,
docs/authors-code.md#prior-dominated-interpretation).

- :mod:`.data`: CIFAR-10 (torchvision download or the offline JPEG copy), the clean/poison split;
  stage ``prepare_cifar``.
- :mod:`.model`: the Atto network, the poison loss, the per-step sampler and augmentation.
- :mod:`.checkpoints`: log-spaced checkpoint folders, the manifest, loading and verifying a step.
- :mod:`.train`: resumable training; stage ``train_convnext``.
- :mod:`.estimate`: a checkpoint's cost, anchor and Adam-ν preconditioner as a sweep point;
  stages ``estimate_figure5``, ``estimate_figure3``, ``estimate_figure7``.
- :mod:`.plot`: stage ``plot_convnext``.
"""
