"""The hot path: strict verify, request scan, Check, bitset, chain, policy, constraints, MCP, tokens.

Each hot module is a pure twin (``_x_py``) of a native one (``_x_c``, built from ``native/_x_c.pyx``),
picked once by the selector ``_accel``. May import identity and the shared vocabulary (errors,
reasons) only: never state, audit, cluster, authority, serve, or gRPC.
"""
