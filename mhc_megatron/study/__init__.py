"""The stability study: residual, HC and mHC side by side over seeds and peak learning rates, with the
Amax gain of the stream mixing over steps and depth (``mhc-study``; docs/stability.md).

``config`` reads a study file and lists its runs, ``runner`` trains them resumably, ``analysis``
turns each run's metrics into the study's numbers, ``report`` writes the report, its plots and the
JSON they are drawn from; ``cli`` is the command.
"""
