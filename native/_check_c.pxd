# cython: language_level=3
"""Declarations of the warm Check path, the twin of ``agentauthz/decision/_check_py.py`` (no cimports yet)."""
