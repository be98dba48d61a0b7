"""derived_tensors.depends_on: the manifest hash a derived tensor was computed from, for gc --purge

Revision ID: 0004
Revises: 0003

For a while the 0003 script itself created this column and index, so registries made then already have
them while saying 0003: each is added only where it is missing.
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if 'depends_on' not in {c['name'] for c in inspector.get_columns('derived_tensors')}:
        op.add_column('derived_tensors', sa.Column('depends_on', sa.String(length=64), nullable=True))
    if 'ix_derived_tensors_depends_on' not in {i['name'] for i in inspector.get_indexes('derived_tensors')}:
        op.create_index(op.f('ix_derived_tensors_depends_on'), 'derived_tensors', ['depends_on'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_derived_tensors_depends_on'), table_name='derived_tensors')
    with op.batch_alter_table('derived_tensors', schema=None) as batch_op:
        batch_op.drop_column('depends_on')
