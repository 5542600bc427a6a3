"""Every error leaves the server as `{"error": {"code", "message", "field"}}` with a 4xx/5xx status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.protocol import ErrorCode, ErrorDetail, ErrorResponse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(), status_code=status, headers={**(headers or {}), "x-error-code": code})


def from_validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """The first problem, with the dotted path of the field at fault (e.g. `sequences.0.3`)."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if field is None and ": " in message:  # cross-field validators write "field: message"
        field = message.split(": ", 1)[0]
        return ApiError(422, ErrorCode.INVALID_REQUEST, message, field)
    where = f"{field}: " if field else ""
    return ApiError(422, ErrorCode.INVALID_REQUEST, f"{where}{message}", field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation_error(exc)
        return error_response(err.status, err.code, err.message, err.field)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # a bug: still JSON, never a page
        return error_response(500, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"[:500])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = ErrorCode.INVALID_REQUEST if exc.status_code < 500 else ErrorCode.INTERNAL
        return error_response(exc.status_code, code, str(exc.detail))
