"""The audit trail: append-only events per case (created, amended, signed off, withdrawn), each with its user.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "case_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False, index=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("app_user", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # created | amended | signed_off | withdrawn
        sa.Column("pathologist_call", sa.String(32), nullable=False, server_default=""),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
    )
    # every case saved before the audit trail gets its "created" event, from what the case row recorded
    op.execute("INSERT INTO case_events (case_id, at, app_user, kind, pathologist_call, note, reason) "
               "SELECT id, created_at, app_user, 'created', pathologist_call, pathologist_note, '' FROM cases")
    # append-only in the database itself, not only in the code
    if op.get_bind().dialect.name == "sqlite":
        for what in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER case_events_no_{what.lower()} BEFORE {what} ON case_events "
                       "BEGIN SELECT RAISE(ABORT, 'case_events is append-only'); END")
    elif op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE FUNCTION case_events_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN RAISE EXCEPTION 'case_events is append-only'; END $$")
        op.execute("CREATE TRIGGER case_events_append_only BEFORE UPDATE OR DELETE ON case_events "
                   "FOR EACH ROW EXECUTE FUNCTION case_events_append_only()")
