"""The package version, importable from every layer without importing the public API."""

from __future__ import annotations

__version__ = "0.1.0"
