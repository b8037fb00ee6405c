"""The version of distill (one place; the package face and every file written record it)."""
__version__ = "0.1.0"
