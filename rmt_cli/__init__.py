"""The umbrella `rmt` command: the library's commands (rmt_core.cli) plus the service's (serve, worker, migrate)
and `rmt remote` (a client of a running service).

This package sits above every other one: it may import app, worker, rmt_service, rmt_client and rmt_core, and
nothing imports it.
"""
