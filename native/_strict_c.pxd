# cython: language_level=3
"""Declarations of strict token text, the twin of ``agentauthz/decision/_strict_py.py``."""

cdef bytes _decode_segment(object segment)
cdef dict _json_object(bytes raw, str what)
