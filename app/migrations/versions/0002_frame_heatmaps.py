"""Each frame's heatmap with its colour scale, for the report.

Revision ID: 0002
Revises: 0001
"""
import os

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("frames", sa.Column("heatmap_png", sa.LargeBinary))
    if os.environ.get("BREAKHIS_TEST_CRASH_IN_MIGRATION") == "0002":  # tests: a kill after the DDL, before the stamp
        os._exit(9)
