"""What persists and what time it is: keyrings, the revocation journal and window, the status list, the clock.

May import decision, identity and the shared vocabulary (durable files are ``agentauthz.durable``);
never audit, cluster, authority or serve.
"""
