"""The package version, in a module of its own so that low layers (the converters' metadata) can
read it without importing the toolkit."""

__version__ = "0.1.0"
