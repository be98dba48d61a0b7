"""source_files: the sha256 of each file a version was imported from, for zoo find

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'source_files',
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('path', sa.String(length=512), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('nbytes', sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id']),
        sa.PrimaryKeyConstraint('version_id', 'path'),
    )
    op.create_index(op.f('ix_source_files_sha256'), 'source_files', ['sha256'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_source_files_sha256'), table_name='source_files')
    op.drop_table('source_files')
