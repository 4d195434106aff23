"""The request path: cache, admission, retry, executors, providers, trace, metrics."""
