"""Celery worker: thin tasks over rmt_core (tuning) and rmt_core.store (state)."""
