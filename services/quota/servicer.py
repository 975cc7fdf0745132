"""QuotaService over gRPC: translation between protobuf messages and the domain modules, nothing more.

Errors are :class:`~services.common.errors.GatewayError` subclasses raised by the domain; the server
interceptor in ``services.common.grpc`` turns them into status codes and trailing metadata.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.common.credit import KEY_SCOPE, Grant, LeaseAsk, LeaseReport, SyncAnswer, SyncRequest
from services.common.errors import InvalidRequest
from services.common.pb.relaygate.common.v1 import types_pb2
from services.common.pb.relaygate.quota.v1 import quota_pb2 as pb
from services.common.pb.relaygate.quota.v1 import quota_pb2_grpc
from services.quota.budgets import Budgets, BudgetStatus
from services.quota.leasing import MAX_ITEMS, CreditStore
from services.quota.ledger import BalanceView, Hold, Ledger, Outcome, ReservationView
from services.quota.limits import Limits, Window
from services.quota.pricing import Price, PriceBook, Usage

__all__ = ["SERVICE_NAME", "QuotaServicer"]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["QuotaService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]


def price_to_pb(price: Price) -> pb.Price:
    return pb.Price(
        model=price.model,
        input_per_mtok=price.input_per_mtok,
        output_per_mtok=price.output_per_mtok,
        cached_input_per_mtok=price.cached_input_per_mtok,
        cache_write_per_mtok=price.cache_write_per_mtok,
        reasoning_per_mtok=price.reasoning_per_mtok,
        per_request=price.per_request,
        per_image=price.per_image,
        default_max_output_tokens=price.default_max_output_tokens,
        price_id=price.price_id,
        created_at=price.created_at,
    )


def price_from_pb(message: pb.Price) -> Price:
    return Price(
        model=message.model,
        input_per_mtok=message.input_per_mtok,
        output_per_mtok=message.output_per_mtok,
        cached_input_per_mtok=message.cached_input_per_mtok,
        cache_write_per_mtok=message.cache_write_per_mtok,
        reasoning_per_mtok=message.reasoning_per_mtok,
        per_request=message.per_request,
        per_image=message.per_image,
        default_max_output_tokens=message.default_max_output_tokens,
    )


def _window_to_pb(window: Window | None) -> pb.RateLimitWindow | None:
    if window is None:
        return None
    return pb.RateLimitWindow(
        limit=window.limit, remaining=window.remaining, reset_ms=max(0, round(window.reset_s * 1000))
    )


def _hold_to_pb(hold: Hold) -> pb.ReserveResponse:
    return pb.ReserveResponse(
        reservation_id=hold.reservation_id,
        reserved_micros=hold.reserved_micros,
        price=price_to_pb(hold.price),
        available_micros=hold.available_micros,
        expires_at=hold.expires_at,
        requests=_window_to_pb(hold.requests),
        tokens=_window_to_pb(hold.tokens),
    )


def _limits_from_pb(message: types_pb2.Limits) -> Limits:
    return Limits(
        rpm=message.rpm,
        tpm=message.tpm,
        max_concurrency=message.max_concurrency,
    )


def _usage_to_pb(usage: Usage) -> types_pb2.Usage:
    return types_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
        images=usage.images,
        estimated=usage.estimated,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )


def _reservation_to_pb(view: ReservationView) -> pb.Reservation:
    return pb.Reservation(
        reservation_id=view.reservation_id,
        user_id=view.user_id,
        key_id=view.key_id,
        model=view.model,
        price_id=view.price_id,
        reserved_micros=view.reserved_micros,
        state=view.state,
        charged_micros=view.charged_micros,
        usage=_usage_to_pb(view.usage),
        created_at=view.created_at,
        expires_at=view.expires_at,
        finished_at=view.finished_at,
    )


def _budget_to_pb(status: BudgetStatus) -> pb.BudgetStatus:
    return pb.BudgetStatus(
        scope=status.scope,
        scope_id=status.scope_id,
        period=status.period,
        limit_micros=status.limit_micros,
        window_start=status.window_start,
        resets_at=status.resets_at,
        spent_micros=status.spent_micros,
        reserved_micros=status.reserved_micros,
        effective_limit_micros=status.effective_limit_micros,
    )


def _outcome_to_pb(outcome: Outcome) -> pb.SettleResponse:
    return pb.SettleResponse(
        reservation_id=outcome.reservation_id,
        state=outcome.state,
        charged_micros=outcome.charged_micros,
        reserved_micros=outcome.reserved_micros,
        repeated=outcome.repeated,
        price_id=outcome.price_id,
    )


def _balance_to_pb(view: BalanceView) -> pb.Balance:
    return pb.Balance(
        user_id=view.user_id,
        balance_micros=view.balance_micros,
        reserved_micros=view.reserved_micros,
        available_micros=view.available_micros,
        written_lsn=view.written_lsn,
    )


def _sync_from_pb(message: pb.SyncRequest) -> SyncRequest:
    # Counted before anything is built from them: a huge message costs no more than a refusal.
    if len(message.reports) > MAX_ITEMS or len(message.asks) > MAX_ITEMS:
        raise InvalidRequest(
            f"a sync carries at most {MAX_ITEMS} reports and {MAX_ITEMS} asks", param="reports"
        )
    return SyncRequest(
        relay_id=message.relay_id,
        seq=message.seq,
        budgeted_version=message.budgeted_keys_version,
        reports=tuple(
            LeaseReport(
                lease_id=r.lease_id,
                used_micros=r.used_micros,
                inflight_micros=r.inflight_micros,
                want_micros=r.want_micros,
                closing=r.closing,
            )
            for r in message.reports
        ),
        asks=tuple(
            LeaseAsk(
                lease_id=a.lease_id,
                key_id=a.key_id,
                user_id=a.user_id,
                want_micros=a.want_micros,
                min_micros=a.min_micros,
                scope=a.scope or KEY_SCOPE,
            )
            for a in message.asks
        ),
    )


def _grant_to_pb(grant: Grant) -> pb.LeaseGrant:
    return pb.LeaseGrant(
        lease_id=grant.lease_id,
        state=grant.state,
        granted_micros=grant.granted_micros,
        valid_for_ms=grant.valid_for_ms,
        recall=grant.recall,
    )


def _answer_to_pb(answer: SyncAnswer) -> pb.SyncResponse:
    message = pb.SyncResponse(grants=[_grant_to_pb(g) for g in answer.grants])
    if answer.budgeted is not None:
        message.budgeted_keys.version = answer.budgeted.version
        message.budgeted_keys.key_ids.extend(sorted(answer.budgeted.key_ids))
        message.budgeted_keys.complete = answer.budgeted.complete
    return message


class QuotaServicer(quota_pb2_grpc.QuotaServiceServicer):
    """``relaygate.quota.v1.QuotaService``."""

    def __init__(self, *, ledger: Ledger, prices: PriceBook, budgets: Budgets, credit: CreditStore) -> None:
        self._ledger = ledger
        self._prices = prices
        self._budgets = budgets
        self._credit = credit

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        hold = await self._ledger.reserve(
            reservation_id=request.reservation_id,
            user_id=request.user_id,
            key_id=request.key_id,
            model=request.model,
            prompt_tokens=request.prompt_tokens,
            max_output_tokens=request.max_output_tokens,
            images=request.images,
            choices=request.choices,
            key_limits=_limits_from_pb(request.key_limits),
            user_limits=_limits_from_pb(request.user_limits),
        )
        return _hold_to_pb(hold)

    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        # An unset usage reads as all zeros, which is a valid usage (the per-request price only).
        usage = Usage(
            prompt_tokens=request.usage.prompt_tokens,
            completion_tokens=request.usage.completion_tokens,
            cached_prompt_tokens=request.usage.cached_prompt_tokens,
            images=request.usage.images,
            estimated=request.usage.estimated,
            cache_write_tokens=request.usage.cache_write_tokens,
            reasoning_tokens=request.usage.reasoning_tokens,
        )
        return _outcome_to_pb(await self._ledger.settle(request.reservation_id, usage))

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.SettleResponse:
        return _outcome_to_pb(await self._ledger.release(request.reservation_id, request.reason))

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Context) -> pb.Balance:
        view = await self._ledger.balance(
            request.user_id, consistent=request.consistent, min_lsn=request.min_lsn
        )
        return _balance_to_pb(view)

    async def TopUp(self, request: pb.TopUpRequest, context: Context) -> pb.Balance:
        view = await self._ledger.top_up(
            user_id=request.user_id,
            amount_micros=request.amount_micros,
            reason=request.reason,
            actor=request.actor,
            idempotency_key=request.idempotency_key,
        )
        return _balance_to_pb(view)

    async def SetBudget(self, request: pb.SetBudgetRequest, context: Context) -> pb.BudgetStatus:
        status = await self._budgets.set_budget(
            scope=request.scope,
            scope_id=request.scope_id,
            period=request.period,
            limit_micros=request.limit_micros,
            actor=request.actor,
        )
        return _budget_to_pb(status)

    async def GetBudgets(self, request: pb.GetBudgetsRequest, context: Context) -> pb.BudgetList:
        statuses = await self._budgets.statuses(
            scope=request.scope, scope_id=request.scope_id, consistent=request.consistent
        )
        return pb.BudgetList(budgets=[_budget_to_pb(s) for s in statuses])

    async def ListReservations(
        self, request: pb.ListReservationsRequest, context: Context
    ) -> pb.ReservationList:
        page = await self._ledger.list_reservations(
            request.user_id,
            state=request.state,
            limit=request.limit,
            cursor=request.cursor,
            consistent=request.consistent,
        )
        return pb.ReservationList(
            reservations=[_reservation_to_pb(v) for v in page.reservations], next_cursor=page.next_cursor
        )

    async def Reconcile(self, request: pb.ReconcileRequest, context: Context) -> pb.ReconcileResponse:
        found = await self._ledger.reconcile(consistent=request.consistent)
        return pb.ReconcileResponse(
            discrepancies=[
                pb.Discrepancy(
                    kind=d.kind,
                    subject=d.subject,
                    stored_micros=d.stored_micros,
                    expected_micros=d.expected_micros,
                    stored_reserved_micros=d.stored_reserved_micros,
                    expected_reserved_micros=d.expected_reserved_micros,
                )
                for d in found
            ]
        )

    async def Sync(self, request: pb.SyncRequest, context: Context) -> pb.SyncResponse:
        return _answer_to_pb(await self._credit.sync(_sync_from_pb(request)))

    async def SetPrice(self, request: pb.Price, context: Context) -> pb.Price:
        return price_to_pb(await self._prices.set_price(price_from_pb(request)))

    async def ListPrices(self, request: pb.ListPricesRequest, context: Context) -> pb.ListPricesResponse:
        listed = await (self._prices.history(request.model) if request.model else self._prices.list_current())
        return pb.ListPricesResponse(prices=[price_to_pb(p) for p in listed])
