"""Maintainer tools (fuzzing, doc generators); run from the repository root as ``python -m scripts.tools.NAME``."""
