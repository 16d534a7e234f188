"""The root of every error a user can cause. The CLI and the server turn these into clear messages
(exit code 2 / HTTP 4xx) instead of tracebacks; anything else is a bug."""


class PolarsparseError(Exception):
    """Base class for errors caused by input (files, requests, parameters), not by bugs."""
