"""Each frame at full resolution (lossless PNG of what the model analysed) and its overlay, for the zoomable viewer.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # cases saved before this revision keep their thumbnail and small heatmap only (NULL here): History says so
    op.add_column("frames", sa.Column("frame_png", sa.LargeBinary))
    op.add_column("frames", sa.Column("overlay_jpeg", sa.LargeBinary))
