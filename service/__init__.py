"""slimserve's HTTP process: routes, schemas, settings, metrics, batching and the loaded-variant index."""

__version__ = "0.1.0"
