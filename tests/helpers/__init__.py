"""Shared test helpers: fixture paths, checkpoint/SAE writers, processes."""
