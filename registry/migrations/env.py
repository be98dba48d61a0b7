"""Alembic environment: always run with a connection handed in by modelzoo.registry.db."""

from alembic import context

from modelzoo.registry.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
context.run_migrations()
