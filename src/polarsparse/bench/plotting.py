"""Headless matplotlib for benchmark plots."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def headless_pyplot():
    """matplotlib.pyplot on the Agg backend, or None (logged) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib missing: no plot")
        return None
    return plt
