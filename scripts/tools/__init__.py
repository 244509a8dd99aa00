"""Maintainer tools: fuzzing and doc generators.

Run from the repository root as ``python -m scripts.tools.NAME``.
"""
