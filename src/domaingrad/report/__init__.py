"""Sweep reports: DomainBed's model selection, result tables, statistics and plots.

From a sweep directory (one sub-directory per job holding ``results.jsonl`` and ``done``)
to the tables the papers publish:

- :mod:`.records`: read every job's records, report unreadable lines and missing jobs;
- :mod:`.selection`: DomainBed's model-selection methods (``domainbed/model_selection.py``;
  Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021) and the
  70/10/20 protocol of Mansilla, Echeveste, Milone, Ferrante, "Domain Generalization via
  Gradient Surgery", ICCV 2021;
- :mod:`.tables`: per-dataset and averages tables, mean +- standard error over trial
  seeds (``domainbed/scripts/collect_results.py``);
- :mod:`.render`: Markdown, LaTeX, CSV and JSON;
- :mod:`.stats`: paired Wilcoxon signed-rank tests against a baseline (Mansilla et al. 2021, Sec. 4.4);
- :mod:`.plots`: box plots (Mansilla et al. 2021, Fig. 3) and training curves as PNG.
"""
