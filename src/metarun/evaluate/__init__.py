"""``metarun-eval``: a trained run's checkpoint scored again, on any tasks.

* :mod:`metarun.evaluate.saved_config`: the run's config rebuilt from its directory, with
  today's defaults for newer settings and Hydra-style overrides on top;
* :mod:`metarun.evaluate.episodes`: the episodes-file format (``--episodes``);
* :mod:`metarun.evaluate.command`: the command itself, which builds, scores and reports through
  the run's own functions (``python -m metarun.evaluate`` is the same command).
"""
