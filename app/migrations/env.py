"""Alembic environment for the case history: always run by app.history.migrate on a connection it has already
opened, locked and begun, so every migration and its version stamp commit in that one transaction."""
from alembic import context

from app.history import meta

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=meta, transactional_ddl=True)
with context.begin_transaction():  # joins the caller's transaction (Alembic neither begins nor commits it)
    context.run_migrations()
