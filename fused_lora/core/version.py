"""The package version (read by the package face and the tuned-choice cache's key)."""
__version__ = "0.1.0"
