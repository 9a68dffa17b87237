"""slimserve's HTTP process: routes, schemas, settings, metrics, batching and the model registry."""

__version__ = "0.1.0"
