"""Sparse autoencoders (Gemma Scope) in Penzai."""
