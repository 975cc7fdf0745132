"""``relaygate.logger.v1.LoggerService``: protobuf in, :mod:`services.logger.query` call, protobuf out."""

from __future__ import annotations

import grpc

from services.common.db import Database
from services.common.pb.relaygate.logger.v1 import logger_pb2, logger_pb2_grpc
from services.logger.query import LogQuery, list_request_logs
from services.logger.writer import to_event

SERVICE_NAME = logger_pb2.DESCRIPTOR.services_by_name["LoggerService"].full_name


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
                since_ms=request.since_ms,
                until_ms=request.until_ms,
                limit=request.limit,
                cursor=request.cursor,
            ),
        )
        return logger_pb2.ListRequestLogsResponse(
            logs=[to_event(row) for row in page.rows], next_cursor=page.next_cursor
        )
