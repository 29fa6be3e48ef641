"""Who may do what on the coordinator (docs/security.md).

``tokens`` makes and parses tokens, ``store`` keeps accounts, token hashes and the
audit log in the scheduler database, ``policy`` is the one table of which role may
call which method, ``interceptor`` checks every call once and attaches the caller,
and ``service`` is the ``Acl`` gRPC service.
"""
