"""fairdistill engine: the asyncio request path and the FAIR data pipeline (no torch here)."""

__version__ = "0.1.0"
