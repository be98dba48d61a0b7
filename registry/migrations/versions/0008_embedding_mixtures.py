"""embeddings: mixture components and the modality embedded (images or texts)

Revision ID: 0008
Revises: 0007

An embedding made before it is one Gaussian: `components` 1 and no weights, which search reads as a
one-component mixture; `zoo index --rebuild` replaces it by a fitted mixture. Its modality follows from
its model's family: language models' samples are texts, every other indexed family's are images.
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('embeddings') as batch:
        batch.add_column(sa.Column('components', sa.Integer(), server_default='1', nullable=False))
        batch.add_column(sa.Column('weights', sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column('modality', sa.String(length=16), server_default='images', nullable=False))
        batch.create_index(batch.f('ix_embeddings_modality'), ['modality'], unique=False)
    op.execute(
        "UPDATE embeddings SET modality = 'texts' WHERE version_id IN "
        "(SELECT versions.id FROM versions JOIN models ON models.id = versions.model_id WHERE models.family = 'lm')"
    )


def downgrade() -> None:
    with op.batch_alter_table('embeddings') as batch:
        batch.drop_index(batch.f('ix_embeddings_modality'))
        batch.drop_column('modality')
        batch.drop_column('weights')
        batch.drop_column('components')
