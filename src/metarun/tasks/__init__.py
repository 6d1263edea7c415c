"""Few-shot tasks, in one place.

- :mod:`metarun.tasks.types`: the value types, ``TaskSplit``, ``Task`` (with its sequence view,
  ``TaskSequence``) and ``TaskBatch`` (a meta-batch stacked); a leaf module.
- :mod:`metarun.tasks.sampling`: the ``Sampler``/``TaskSource`` protocols, learn2learn's
  ``TaskDataset`` behind ``TaskSampler``, ``FixedTasks`` (validation and test) and ``OneGroup``.
- :mod:`metarun.tasks.device`: a whole meta-batch drawn on the device (``sampler=device``).

Import each name from the module that defines it; this package re-exports nothing.
"""
