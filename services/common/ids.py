"""Identifiers: time-ordered, URL-safe, and unguessable."""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    """``<prefix>_<12 hex ms timestamp><16 hex random>``: sorts by creation time, safe in URLs and logs."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(8).hex()}"
