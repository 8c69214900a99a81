"""Load benchmarks: agentauthz's Check against a gRPC floor and a naive PyJWT peer, direct and through Envoy.

Run with ``python -m benchmarks.load`` (or ``make bench``, which also runs the
micro benchmarks and writes the report); see ``run.py``.
"""
