"""The one error type of the adapter package (its own module so every other module can raise it)."""
from __future__ import annotations


class LynxAdapterError(ValueError):
    """Adapter files or an adapter/model pairing that cannot work; the message says how to fix it."""
