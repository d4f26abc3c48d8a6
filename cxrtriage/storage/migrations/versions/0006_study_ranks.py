"""study_ranks: one ranking row per study, filled from the images already held

The worklist's ranking query grouped every source image by study on each
request (80 ms at 10 000 studies on SQLite). It now reads one row per study,
kept current by ingest, scoring and purge (triage/study_rank.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 21:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'study_ranks',
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('modalities', sa.String(length=128), nullable=False),
        sa.Column('requested', sa.String(length=128), nullable=False),
        sa.Column('dimse_high', sa.Integer(), nullable=False),
        sa.Column('pending', sa.Integer(), nullable=False),
        sa.Column('worst_key', sa.Float(), nullable=True),
        sa.Column('worst_key_plain', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('study_instance_uid'),
    )
    # The rows of the studies already held. A snapshot of triage/study_rank.py's query at this revision
    # (migrations never import the application): tests/test_study_rank.py checks both give the same rows.
    sqlite = op.get_bind().dialect.name == "sqlite"
    listed = ("coalesce(',' || group_concat(DISTINCT nullif(upper(trim({0})), '')) || ',', ',')" if sqlite else
              "coalesce(',' || string_agg(DISTINCT nullif(upper(trim({0})), ''), ',') || ',', ',')")
    least = "min" if sqlite else "least"
    tail = "coalesce(r.brixia_total, 0) * 2.0 + coalesce(r.p_disease, 0.0)"
    op.execute(f"""
        INSERT INTO study_ranks (study_instance_uid, received_at, modalities, requested, dimse_high, pending,
                                 worst_key, worst_key_plain)
        SELECT i.study_instance_uid, min(i.received_at), {listed.format('i.modality')},
               {listed.format('i.requested_priority')},
               max(CASE WHEN i.dimse_priority = 1 THEN 1 ELSE 0 END),
               max(CASE WHEN r.status IS NULL THEN 1 ELSE 0 END),
               max(CASE WHEN r.status = 'scored' THEN {least}(coalesce(r.total_score, 0) + 6
                        - coalesce(r.zones_scored, 6), 6) * 1000.0 + {tail} END),
               max(CASE WHEN r.status = 'scored' THEN {least}(coalesce(r.total_score, 0), 6) * 1000.0 + {tail} END)
        FROM instances i LEFT JOIN results r ON r.instance_id = i.id
        WHERE i.kind = 'source' AND i.duplicate_of_id IS NULL
        GROUP BY i.study_instance_uid
    """)


def downgrade() -> None:
    op.drop_table('study_ranks')
