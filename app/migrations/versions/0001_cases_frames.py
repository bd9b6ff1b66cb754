"""The first history schema: cases and their frames.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("magnification", sa.String(8), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False), sa.Column("verdict_reason", sa.Text, nullable=False),
        sa.Column("mean_p", sa.Float), sa.Column("n_frames", sa.Integer, nullable=False),
        sa.Column("n_referred", sa.Integer, nullable=False),
        sa.Column("pathologist_call", sa.String(32), nullable=False, server_default=""),
        sa.Column("pathologist_note", sa.Text, nullable=False, server_default=""),
        sa.Column("app_user", sa.String(100), nullable=False, server_default=""),
    )
    op.create_table(
        "frames",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False, index=True),
        sa.Column("file_name", sa.String(500), nullable=False), sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("thumbnail_png", sa.LargeBinary),
        sa.Column("magnification", sa.String(8), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False), sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("card_sha256", sa.String(64), nullable=False), sa.Column("tta", sa.Boolean, nullable=False),
        sa.Column("p_malignant", sa.Float), sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False), sa.Column("warnings", sa.Text, nullable=False),
        sa.Column("heatmap_method", sa.String(32), nullable=False, server_default=""),
    )
