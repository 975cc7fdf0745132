"""auth: admin_token_revocations, the admin tokens ended before their expiry (signing out)

Admin tokens are stateless JWTs checked against their key's row on every use; a sign-out ends one
token only, so its id (the ``jti`` claim) is kept here until the token would have expired anyway.
Rows past their expiry are deleted whenever a token is revoked.

Revision ID: auth_0002
Revises: auth_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "auth_0002"
down_revision = "auth_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_token_revocations",
        sa.Column("token_id", sa.String(length=40), nullable=False),
        sa.Column("expires_at", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_admin_token_revocations")),
    )
    op.create_index(op.f("ix_admin_token_revocations_expires_at"), "admin_token_revocations", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_admin_token_revocations_expires_at"), table_name="admin_token_revocations")
    op.drop_table("admin_token_revocations")
