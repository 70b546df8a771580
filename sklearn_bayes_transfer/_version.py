"""The package version, in a leaf module that every other module may import."""

__all__ = ["__version__"]

__version__ = "0.1.0"
