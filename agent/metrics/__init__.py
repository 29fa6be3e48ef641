"""Observability: Prometheus metrics, health/readiness probes and the status API.

``build_telemetry`` makes the registry; ``StatusServer`` serves it with
``/healthz``, ``/readyz`` and ``/status``. Nothing here touches the global
prometheus_client registry.
"""
