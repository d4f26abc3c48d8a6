"""results.zones_scored: the number of scored zones as a column, for ranking

The worklist ranks every unread study on each request; a lung that was not
found counts as affected, so the ranking needs each image's number of scored
zones. As a column it costs no JSON parse per image. Rows written before the
field existed are filled from their JSON (6 when the JSON has none).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 15:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results') as batch:
        batch.add_column(sa.Column('zones_scored', sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == 'postgresql':
        extracted = "CAST(CAST(details AS json) ->> 'zones_scored' AS INTEGER)"
    else:
        extracted = "CAST(json_extract(details, '$.zones_scored') AS INTEGER)"
    op.execute(f"UPDATE results SET zones_scored = COALESCE({extracted}, 6) WHERE status = 'scored'")


def downgrade() -> None:
    with op.batch_alter_table('results') as batch:
        batch.drop_column('zones_scored')
