"""What changes state: mint, delegate, human approvals, task budgets, revoke, end task (``core.Authority``).

Owns the operations the API calls and what they answer (``outcomes``). May import cluster, audit,
state, decision, identity, config and the shared vocabulary; never serve or gRPC.
"""
