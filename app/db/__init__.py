"""The audit log of edits in SQL: the source of truth for which edits are live."""

from app.db.models import Base, Edit, EditStatus
from app.db.session import Database

__all__ = ["Base", "Database", "Edit", "EditStatus"]
