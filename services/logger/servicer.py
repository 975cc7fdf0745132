"""``relaygate.logger.v1.LoggerService``: protobuf in, :mod:`.query` or :mod:`.usage` call, protobuf out."""

from __future__ import annotations

import grpc

from services.common.db import Database
from services.common.errors import InvalidRequest
from services.common.pb.relaygate.logger.v1 import logger_pb2, logger_pb2_grpc
from services.logger.query import LogQuery, list_request_logs
from services.logger.usage import Dimension, Granularity, UsageQuery, summarize_usage
from services.logger.writer import to_event

SERVICE_NAME = logger_pb2.DESCRIPTOR.services_by_name["LoggerService"].full_name

_DIMENSIONS: dict[int, Dimension] = {
    logger_pb2.USAGE_GROUP_BY_KEY: "key_id",
    logger_pb2.USAGE_GROUP_BY_USER: "user_id",
    logger_pb2.USAGE_GROUP_BY_MODEL: "model",
}
_GRANULARITIES: dict[int, Granularity] = {
    logger_pb2.USAGE_GRANULARITY_UNSPECIFIED: "hour",
    logger_pb2.USAGE_GRANULARITY_HOUR: "hour",
    logger_pb2.USAGE_GRANULARITY_DAY: "day",
}


class LoggerServicer(logger_pb2_grpc.LoggerServiceServicer):
    def __init__(self, db: Database) -> None:
        self._db = db

    async def ListRequestLogs(
        self,
        request: logger_pb2.ListRequestLogsRequest,
        context: grpc.aio.ServicerContext[
            logger_pb2.ListRequestLogsRequest, logger_pb2.ListRequestLogsResponse
        ],
    ) -> logger_pb2.ListRequestLogsResponse:
        page = await list_request_logs(
            self._db,
            LogQuery(
                key_id=request.key_id,
                user_id=request.user_id,
                model=request.model,
                status_code=request.status_code,
                error_type=request.error_type,
                since_ms=request.since_ms,
                until_ms=request.until_ms,
                limit=request.limit,
                cursor=request.cursor,
            ),
        )
        return logger_pb2.ListRequestLogsResponse(
            logs=[to_event(row) for row in page.rows], next_cursor=page.next_cursor
        )

    async def GetUsageSummary(
        self,
        request: logger_pb2.GetUsageSummaryRequest,
        context: grpc.aio.ServicerContext[
            logger_pb2.GetUsageSummaryRequest, logger_pb2.GetUsageSummaryResponse
        ],
    ) -> logger_pb2.GetUsageSummaryResponse:
        page = await summarize_usage(self._db, usage_query(request))
        return logger_pb2.GetUsageSummaryResponse(
            buckets=[
                logger_pb2.UsageBucket(
                    bucket_start_ms=row.bucket_start_ms,
                    key_id=row.key_id,
                    user_id=row.user_id,
                    model=row.model,
                    **row.counters,
                )
                for row in page.rows
            ],
            next_cursor=page.next_cursor,
            since_ms=page.since_ms,
            until_ms=page.until_ms,
        )


def usage_query(request: logger_pb2.GetUsageSummaryRequest) -> UsageQuery:
    """The :class:`UsageQuery` of a request; unknown enum values are refused, not ignored."""
    dimensions: set[Dimension] = set()
    for value in request.group_by:
        dimension = _DIMENSIONS.get(value)
        if dimension is None:
            raise InvalidRequest(f"cannot group usage by enum value {value}", param="group_by")
        dimensions.add(dimension)
    granularity = _GRANULARITIES.get(request.granularity)
    if granularity is None:
        raise InvalidRequest(f"unknown granularity enum value {request.granularity}", param="granularity")
    return UsageQuery(
        group_by=frozenset(dimensions),
        granularity=granularity,
        key_id=request.key_id,
        user_id=request.user_id,
        model=request.model,
        since_ms=request.since_ms,
        until_ms=request.until_ms,
        limit=request.limit,
        cursor=request.cursor,
    )
