"""The dry-run's own error (the planner's input errors are ValueErrors)."""


class DryRunError(RuntimeError):
    """The dry-run cannot run in this environment (a live process group, no matplotlib, ...)."""


__all__ = ["DryRunError"]
