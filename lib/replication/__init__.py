"""The replication of Scherlis & Belrose's experiments, built on the estimator :mod:`localvol`.

- :mod:`replication.pipeline`: notebook parameters, the notebook runner, profiles, result files.
- :mod:`replication.sweep`: the one sweep driver (estimate units, resume, records, summaries).
- :mod:`replication.plots`: figure helpers by plot kind.
- :mod:`replication.mlp`, :mod:`replication.pythia`, :mod:`replication.convnext`: one package
  per experiment, holding only what differs (data, model, training, cost, preconditioners).

``localvol`` never imports this package.
"""
