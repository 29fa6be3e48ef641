"""The relay: buyers' HTTP(S) and TCP connections in, agents' outbound tunnels out.

Runs inside ``gpu-scheduler serve`` (default) or on its own (``gpu-scheduler relay``).
Design: PROTOCOL.md "Relay tunnel"; operators' guide: docs/services.md.
"""
