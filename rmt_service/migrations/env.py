"""Alembic environment: run with a connection handed in by rmt_service.migrate (never reads alembic.ini)."""
from __future__ import annotations

from alembic import context

from rmt_service.db import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # `alembic` CLI use (autogenerate by developers): a URL in the config
    from sqlalchemy import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    connection = engine.connect()

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
