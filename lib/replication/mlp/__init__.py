"""The digits MLP experiment (the paper's Figure 1; docs/experiments.md#figure-1): :mod:`.data`
(the UCI digits and their split), :mod:`.model` (the MLP, training, saving), :mod:`.curvature`
(the curvature behind the preconditioners), :mod:`.estimate` (the ``estimate_figure1`` stage)
and :mod:`.plot` (the ``plot_figure1`` stage)."""
