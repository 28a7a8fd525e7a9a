"""The service's shared layer: settings, records database, blob store and the job state machine.

app/ (HTTP API) and worker/ (Celery tasks) are thin over this package; rmt_core (the method) knows
nothing of it.
"""
