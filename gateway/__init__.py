"""ai-gateway: a distributed AI gateway backed by Redis."""

__version__ = "0.1.0"
