"""The ``mhc-train`` job: the command (``cli``), its configuration (``config``, ``arguments``), what
a run is built of (``builders``), the loop (``loop``), checkpoints with exact resume
(``checkpoints``), metrics (``metrics``) and the pipeline-wide Amax gain (``amax``).

Import the modules themselves (``mhc_megatron.training.loop.train``, ...): this file imports none,
so that ``cli`` can silence megatron-core's start-up notices before megatron-core is imported.
``python -m mhc_megatron.train`` runs ``cli.main``.
"""
