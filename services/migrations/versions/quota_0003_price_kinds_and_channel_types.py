"""quota: prices for cache writes and reasoning tokens; the catalog's channel type and api-version

``prices`` gains ``cache_write_per_mtok`` and ``reasoning_per_mtok`` (0: billed at the input and the
output price, which is what every existing price meant). ``channels`` (the catalog's table, in
quota's database) gains ``type`` (existing channels are ``openai``: OpenAI-compatible, sent as is)
and ``api_version`` (Azure OpenAI's, empty elsewhere).

Revision ID: quota_0003
Revises: quota_0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "quota_0003"
down_revision = "quota_0002"
branch_labels = None
depends_on = None

_PRICE_KINDS = ("cache_write_per_mtok", "reasoning_per_mtok")


def _bigint() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("prices", schema=None) as batch_op:
        for name in _PRICE_KINDS:
            batch_op.add_column(sa.Column(name, _bigint(), server_default="0", nullable=False))
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("type", sa.String(length=32), server_default="openai", nullable=False))
        batch_op.add_column(sa.Column("api_version", sa.String(length=64), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("channels", schema=None) as batch_op:
        batch_op.drop_column("api_version")
        batch_op.drop_column("type")
    with op.batch_alter_table("prices", schema=None) as batch_op:
        for name in reversed(_PRICE_KINDS):
            batch_op.drop_column(name)
