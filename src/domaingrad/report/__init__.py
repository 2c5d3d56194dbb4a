"""Sweep reports: DomainBed's model selection, result tables, statistics and plots.

From a sweep directory (one sub-directory per job holding ``results.jsonl`` and ``done``)
to the tables the papers publish:

- :mod:`.records`: read every job's records, report unreadable lines and missing jobs,
  flag done jobs without a record and steps recorded twice (counted once);
- :mod:`.selection`: DomainBed's model-selection methods (``domainbed/model_selection.py``;
  Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021) and the
  70/10/20 protocol of Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via
  Gradient Surgery", ICCV 2021;
- :mod:`.checks`: refuse to merge runs that differ in an argument a sweep keeps fixed,
  and say which runs the X cells lack;
- :mod:`.tables`: per-dataset and averages tables, mean +- standard error over trial
  seeds (``domainbed/scripts/collect_results.py``);
- :mod:`.top_hparams`: the hyperparameters each selection method picks
  (``domainbed/scripts/list_top_hparams.py``);
- :mod:`.render`: Markdown, LaTeX, CSV and JSON;
- :mod:`.stats`: paired Wilcoxon signed-rank tests against a baseline (Mansilla et al. 2021, Sec. 4.4);
- :mod:`.plots`: box plots (Mansilla et al. 2021, Fig. 3) and training curves as PNG.
"""
