"""Figure helpers by plot kind, shared by the experiments' plot stages: per-sample histograms
(:mod:`.histograms`: Figures 1, 2, 3), aggregates across training (:mod:`.training`: Figures 4,
5), cutoff sweeps (:mod:`.cutoffs`: Figures 6, 7), and writing figures and tables
(:mod:`.outputs`)."""
