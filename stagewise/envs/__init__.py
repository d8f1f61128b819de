"""Multi-turn environments: the interface (base.py), tool schemas and parsing (tools.py), simulated users (users.py)."""
