"""FastAPI service: routers over the store (rmt_service), a job queue and a classifier cache."""
