"""Interpretability analyses of a version, kept in the registry beside it (`registry/analyses.py`):
linear relational embeddings (`lre`) and function vectors (`fv`). Each kind is a plugin under the
entry-point group `modelzoo.analyses`; this package imports only `modelzoo.registry`."""
