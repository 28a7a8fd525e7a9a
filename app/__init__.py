"""FastAPI service: routers over the ClassifierStore, a job queue and a classifier cache."""
