"""Transport: server assembly, ext_authz Check, the API and approvals API, TLS front, HTTP, workers.

Owns every listener and gRPC servicer and the worker processes. May import every layer below it
(authority, cluster, audit, state, decision, identity) and the shared vocabulary; nothing below it
imports serve, and nothing below it builds gRPC servicers.
"""
