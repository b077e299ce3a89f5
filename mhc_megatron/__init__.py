"""mhc_megatron: manifold-constrained hyper-connections (mHC) for megatron-core.

``method`` (the method's constants and formulas), ``ops`` (functional reference operators),
``modules`` (hyper-connection and stream modules, stability diagnostics), ``megatron`` (the
megatron-core integration: ``model/`` builds the model, ``pipeline/`` runs it), ``data`` and
``training`` (the ``mhc-train`` job), ``bench``, ``compare`` and ``plan`` (the other commands).
docs/architecture.md maps every module. Importing this package imports neither megatron-core nor
anything that touches a GPU; ``mhc_megatron.megatron`` imports megatron-core.
"""

__version__ = "0.1.0"
