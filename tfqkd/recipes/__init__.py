"""Runnable recipes: thin ``main(argv)`` modules composing the library.

``python -m tfqkd.recipes.qkd`` (the thesis pipeline), ``baseline``, ``kd``,
``ptq`` and ``qat``. Configs with the thesis's hyperparameters ship in
``configs/``.
"""
