"""Sweep reports: DomainBed's model selection, result tables, statistics and plots.

From a sweep directory (one sub-directory per job holding ``results.jsonl`` and ``done``)
to the tables the papers publish:

- :mod:`.records`: read every job's records, report unreadable lines and missing jobs;
- :mod:`.selection`: DomainBed's model-selection methods (``domainbed/model_selection.py``)
  and seed 002's 70/10/20 protocol;
- :mod:`.tables`: per-dataset and averages tables, mean +- standard error over trial
  seeds (``domainbed/scripts/collect_results.py``);
- :mod:`.render`: Markdown, LaTeX, CSV and JSON;
- :mod:`.stats`: paired Wilcoxon signed-rank tests against a baseline (seed 002);
- :mod:`.plots`: box plots (seed 002 Fig. 3) and training curves as PNG.
"""
