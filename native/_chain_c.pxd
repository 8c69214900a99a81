# cython: language_level=3
"""Declarations of the audit hash chain, the twin of ``agentauthz/decision/_chain_py.py`` (no cimports yet)."""
