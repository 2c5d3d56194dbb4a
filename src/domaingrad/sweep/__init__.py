"""Sweeps of training runs with DomainBed's ``scripts/sweep.py`` semantics.

- :mod:`.jobs`: the job list (datasets x algorithms x test environments x hparam draws x
  trials), job directory names, job states;
- :mod:`.manifest`: ``SWEEP_DIR/sweep.json``, every job ever launched there;
- :mod:`.worker` / :mod:`.execute`: one job as a fresh Python process, its lock and outcome;
- :mod:`.launchers`, :mod:`.ray_launcher`, :mod:`.slurm_launcher`: sequential, local
  parallel, Ray and Slurm (submitit);
- :mod:`.progress`: the progress view; :mod:`.command`: ``domaingrad sweep``.

Nothing heavy is imported here: the CLI builds its parser from :mod:`.command`.
"""
