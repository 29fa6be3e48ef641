"""Protocol v1: ``.proto`` sources and their generated modules (``make proto``).

See PROTOCOL.md at the repository root for every message, field and rule.
"""
