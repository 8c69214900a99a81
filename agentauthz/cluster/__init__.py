"""Replication of state changes to every decider: today forked Check workers, later remote replicas.

The one seam through which a revocation, a key or a policy reaches another process. May import
audit, state, decision, identity and the shared vocabulary; never authority or serve (the fleet
that carries the messages is passed in).
"""
