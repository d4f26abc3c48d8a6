"""Alembic environment: runs against the engine handed over by Database.migrate()."""

from __future__ import annotations

from alembic import context

from cxrtriage.storage.models import Base

config = context.config
engine = config.attributes.get("connection_engine")
if engine is None:  # run from the alembic command line
    from cxrtriage.storage.db import make_engine

    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("no sqlalchemy.url in the Alembic configuration")
    engine = make_engine(url)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
