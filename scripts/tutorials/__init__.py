"""Cell sources of the tutorial notebooks (written by ``scripts/make_notebooks.py``).

Each module holds ``CELLS``: a list of ``("md" | "code", source)`` pairs.
"""
