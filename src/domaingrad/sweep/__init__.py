"""Sweeps of training runs with DomainBed's ``scripts/sweep.py`` semantics.

- :mod:`.jobs`: the job list (datasets x algorithms x test environments x hparam draws x
  trials), job directory names, job states (:class:`domaingrad.layout.JobState`);
- :mod:`.manifest`: ``SWEEP_DIR/sweep.json``, every job ever launched there;
- :mod:`.worker` / :mod:`.execute`: one job as a fresh Python process, its lock and outcome;
- :mod:`.launchers`: sequential and local parallel (:mod:`.launchers.local`), Ray
  (:mod:`.launchers.ray`) and Slurm through submitit (:mod:`.launchers.slurm`), on the
  shared :mod:`.launchers.base`;
- :mod:`.progress`: the progress view; :mod:`.command`: ``domaingrad sweep``.

Nothing heavy is imported here: the CLI builds its parser from :mod:`.command`.
"""

#: TrainArgs fields a sweep may set for every job beside DomainBed's (here, not in
#: :mod:`.jobs`, so that building the command line's parser imports no more than this)
TRAIN_OPTIONS = ("weights", "image_size", "split_protocol", "class_map", "corrupt_images", "clean_eval")
