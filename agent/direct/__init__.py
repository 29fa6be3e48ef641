"""Direct mode (``services.mode: direct``): the agent serves service leases itself on
its advertise address (publisher.py, front.py, ports.py)."""
