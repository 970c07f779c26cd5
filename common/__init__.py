"""Shared pieces of both stages: model registry, shard format, BN hooks, real-data loaders."""
