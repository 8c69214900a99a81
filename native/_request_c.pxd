# cython: language_level=3
"""The native CheckRequest scanner (``_request_c.pyx``) exports only ``scan``: nothing to cimport."""
