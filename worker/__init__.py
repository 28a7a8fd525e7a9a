"""Celery worker: thin tasks over rmt_core (tuning) and rmt_service.store (records and blobs)."""
