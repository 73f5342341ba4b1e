"""The composition root: the `carelog` command (`cli`) and one bootstrap per process.

The only modules that import more than one service: each builds its process's
dependencies from settings, wires them and runs it.
"""
