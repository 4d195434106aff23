"""The run directory: record kinds, shards and manifest, export, status, repair."""
