"""The fixed catalogue of refusals: what a client is told, whatever went wrong inside.

Details go to the server's log; the client gets one of a few fixed bodies, so that a refusal
never tells an attacker which check failed.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppml.attestation.challenge import ChallengeCapacityExceeded
from ppml.errors import (
    AccessDenied,
    AttestationFailed,
    IntegrityError,
    KeyExists,
    KeyNotFound,
    KeyVersionNotFound,
    PPMLError,
    UsageError,
)
from ppml.server.boundary import CATALOGUE, Refused, refusal_response

__all__ = ["CATALOGUE", "install_error_handlers", "refusal"]

_log = logging.getLogger("ppml.server")


def refusal(status: int) -> JSONResponse:
    return refusal_response(status)


def status_for(exc: PPMLError) -> int:
    if isinstance(exc, ChallengeCapacityExceeded):
        return 429
    if isinstance(exc, AttestationFailed):
        return 401
    if isinstance(exc, AccessDenied):
        return 403
    if isinstance(exc, KeyNotFound | KeyVersionNotFound):
        return 404
    if isinstance(exc, KeyExists):
        return 409
    if isinstance(exc, UsageError | IntegrityError):
        return 400
    return 403


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure onto the catalogue."""

    @app.exception_handler(PPMLError)
    async def _ppml_error(request: Request, exc: PPMLError) -> JSONResponse:
        status = status_for(exc)
        _log.info("refused %s %r: %s: %s", request.method, request.url.path, status, exc.message)
        if status == 429:
            return refusal_response(429, headers={"Retry-After": "1"})
        return refusal(status)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        _log.info("refused %s %r: %s: %s", request.method, request.url.path, exc.status, exc.code)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        _log.info("refused %s %r: invalid request body", request.method, request.url.path)
        return refusal(400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code if exc.status_code in CATALOGUE else 400
        return refusal(status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.error(
            "internal error on %s %r: %s", request.method, request.url.path, type(exc).__name__
        )
        return refusal(500)
