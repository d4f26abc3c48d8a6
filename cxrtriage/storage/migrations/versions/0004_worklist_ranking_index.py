"""instances: a partial covering index for ranking the worklist in SQL

The worklist's ranking query (triage/ranking_sql.py) groups every
non-duplicate source image by study on each request. This index holds exactly
those rows, in study order, with the columns the query reads, so the database
scans it instead of the whole table and needs no sort for the grouping.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 17:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

COLUMNS = ['study_instance_uid', 'received_at', 'modality', 'requested_priority', 'dimse_priority', 'id']
WHERE = sa.text("kind = 'source' AND duplicate_of_id IS NULL")


def upgrade() -> None:
    op.create_index('ix_instances_ranking', 'instances', COLUMNS, sqlite_where=WHERE, postgresql_where=WHERE)


def downgrade() -> None:
    op.drop_index('ix_instances_ranking', table_name='instances')
