"""The package version, in a module of its own so that anything can read it without importing torch."""

__version__ = "0.1.0"
