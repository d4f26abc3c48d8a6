"""Durable state of the node: database (SQLAlchemy 2, Alembic), archive on disk, job queue."""
