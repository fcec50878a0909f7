"""Clean vs poisoned digits MLPs (beyond the paper; docs/experiments.md#poisoned-digits,
docs/claims.md#poisoned-networks-have-smaller-volume).

The paper's generalisation claim ("badly-generalizing behavioral regions are smaller", §4.2)
tested where a CPU can: the Figure 1 MLP recipe, several training seeds per condition, and every
preconditioner chosen honestly (:mod:`localvol.selection`).

- :mod:`.train`: the clean/poison split of the training images and the networks; stage
  ``train_poison_digits``.
- :mod:`.estimate`: naive and preconditioned estimates with pilot-selected ε and exponent;
  stage ``estimate_poison_digits``.
- :mod:`.plot`: the figure, the table and the comparison; stage ``plot_poison_digits``.
"""
