"""dtake: high-availability file replication for Linux clusters."""

__version__ = "0.1.0"
__all__ = ["__version__"]
