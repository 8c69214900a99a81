"""agentauthz: an authorization daemon for autonomous AI agents."""

__version__ = "0.1.0"
