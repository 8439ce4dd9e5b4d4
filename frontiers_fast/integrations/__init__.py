"""Drop-in use of frontiers_fast's kernels inside other libraries' models.

* :mod:`frontiers_fast.integrations.transformers`: :func:`~frontiers_fast.integrations.transformers.kernelize`
  swaps Hugging Face transformers' ``MambaMixer`` layers for ones on the selective-scan kernels.

The submodules import their library when they are imported, not here, so that
``import frontiers_fast`` never needs them.
"""
