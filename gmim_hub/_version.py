"""The version of gmim-hub, in a module of its own so that any layer can read it without importing the public API
(`gmim_hub/__init__`, which sits above every other module)."""

__version__ = "0.1.0"
