"""quota: relay leases as holds, and ledger charges that name their hold

A lease is a row of ``reservations`` with ``kind = 'lease'`` and the columns quota's credit books keep
per hold (the relay, granted/applied/over, the relay's last report and its sequence number, recall,
phase, given up, expiry in milliseconds). Existing rows become ``kind = 'reservation'`` with zeros.
``ledger_entries`` gains ``hold_id`` (the reservation or lease a charge is against; existing charges get
their reservation id, which is what they were against) and ``written_off_micros``.

Revision ID: quota_0002
Revises: quota_0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "quota_0002"
down_revision = "quota_0001"
branch_labels = None
depends_on = None

_AMOUNTS = (
    "granted_micros",
    "applied_micros",
    "over_micros",
    "used_reported_micros",
    "inflight_reported_micros",
)


def _bigint() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="reservation", nullable=False)
        )
        batch_op.add_column(sa.Column("relay_id", sa.String(length=64), server_default="", nullable=False))
        for name in _AMOUNTS:
            batch_op.add_column(sa.Column(name, _bigint(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("seq", _bigint(), server_default="-1", nullable=False))
        batch_op.add_column(sa.Column("recall", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("phase", sa.String(length=16), server_default="", nullable=False))
        batch_op.add_column(sa.Column("given_up", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("expires_at_ms", _bigint(), server_default="0", nullable=False))
        batch_op.create_index(
            "ix_reservations_kind_state_expires_ms", ["kind", "state", "expires_at_ms"], unique=False
        )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hold_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("written_off_micros", _bigint(), server_default="0", nullable=False))
        batch_op.create_index(batch_op.f("ix_ledger_entries_hold_id"), ["hold_id"], unique=False)
    op.execute("UPDATE ledger_entries SET hold_id = reservation_id WHERE kind = 'charge'")


def downgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_entries_hold_id"))
        batch_op.drop_column("written_off_micros")
        batch_op.drop_column("hold_id")
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index("ix_reservations_kind_state_expires_ms")
        for name in ("expires_at_ms", "given_up", "phase", "recall", "seq", *reversed(_AMOUNTS)):
            batch_op.drop_column(name)
        batch_op.drop_column("relay_id")
        batch_op.drop_column("kind")
