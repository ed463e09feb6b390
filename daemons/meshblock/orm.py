"""Column shapes and conventions shared by the MDM's and MGMT's ORM models.

Each daemon has its own declarative ``Base`` (its own metadata and migrations); they
share the constraint naming convention, so that migrations name constraints the same
way on SQLite and PostgreSQL, and the repeated column shapes.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated

from sqlalchemy import DateTime, Enum, Integer, func
from sqlalchemy.orm import mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

intpk = Annotated[int, mapped_column(Integer, primary_key=True, autoincrement=True)]
created_at = Annotated[
    dt.datetime, mapped_column(DateTime(timezone=True), server_default=func.now())
]


def str_enum(cls: type[enum.Enum], name: str) -> Enum:
    """A column of a ``StrEnum``'s values, stored as a short string (no native type)."""
    return Enum(
        cls,
        name=name,
        values_callable=lambda e: [m.value for m in e],
        native_enum=False,
        length=16,
        validate_strings=True,
    )
