"""Pythia across training (paper §4.3, Figures 2, 4, 6; docs/experiments.md#pythia,
docs/authors-code.md#script-slips, docs/authors-code.md#prior-dominated-interpretation).

- :mod:`.data`: the tokenizer, the pydoc corpus, token streams, the evaluation text.
- :mod:`.checkpoints`: the model's shape, the step list, the checkpoint folders, loading a step
  and checking its weights against the fetch stage's record.
- :mod:`.train`: the local source (a scaled-down Pythia trained here).
- :mod:`.fetch`: stage ``fetch_pythia``.
- :mod:`.moments`: Adam's ν (optimizer state, raw DeepSpeed groups, squared-gradient EMA).
- :mod:`.points`: a checkpoint's cost, anchor and preconditioners as a sweep point.
- :mod:`.estimate`: stages ``estimate_figure4``, ``estimate_figure2``, ``estimate_figure6``.
- :mod:`.plot`: stage ``plot_pythia``.
"""
