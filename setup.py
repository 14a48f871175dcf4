"""The optional C accelerator of the replay (estimator/_replay.c). Everything else is in pyproject.toml.

``optional=True``: without a compiler, or when the build fails, the install goes on without it and the
estimator runs its pure-Python replay (the reference), with the same answers, more slowly.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("estimator._replay", ["estimator/_replay.c"], optional=True)])
