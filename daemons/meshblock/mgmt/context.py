"""What MGMT's handlers and background tasks share, under one typed app key."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import jinja2
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from meshblock.auth import TokenTable
from meshblock.mgmt.config import MgmtConfig
from meshblock.mgmt.metrics import MgmtMetrics
from meshblock.mgmt.throttle import LoginThrottle, PasswordChecks


@dataclass
class MgmtContext:
    config: MgmtConfig
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    http: aiohttp.ClientSession  # to Prometheus and Alertmanager
    mdm_http: aiohttp.ClientSession  # to the MDM: with [tls], its certificate and CA
    templates: jinja2.Environment
    metrics: MgmtMetrics
    webhook_tokens: TokenTable
    logins: LoginThrottle
    password_checks: PasswordChecks


CTX = web.AppKey("meshblock_mgmt_context", MgmtContext)


def ctx(request: web.Request) -> MgmtContext:
    return request.app[CTX]
