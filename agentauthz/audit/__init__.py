"""The audit trail and the counts: the writer, record formats, log files, the offline verifier, metrics.

May import state, decision, identity and the shared vocabulary; never authority, cluster or serve.
"""
