from services.common.db.base import Base
from services.common.db.routing import Database, ReplicaState

__all__ = ["Base", "Database", "ReplicaState"]
