"""The one error type of the analysis package."""
from provlae.errors import ProvlaeError


class AnalysisError(ProvlaeError, ValueError):
    """The question cannot be answered from this input: unknown experiment, no runs, unknown metric.

    The CLI prints ``error: <message>`` and exits with status 2.
    """
