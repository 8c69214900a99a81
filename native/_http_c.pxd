# cython: language_level=3
"""The native HTTP ext_authz scanner and answers (``_http_c.pyx``) export only Python names: nothing to cimport."""
