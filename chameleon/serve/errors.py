"""HTTP errors in OpenAI's JSON shape, and the mapping from Chameleon's typed errors.

Body: `{"error": {"message", "type", "param", "code"}}`. Unknown model 404, bad parameters 400,
missing or wrong key 401, adapter path outside the allowed roots 403, conflicts 409, overload 429.
"""

from __future__ import annotations

import attrs
from fastapi.responses import JSONResponse

from chameleon import errors as ce


@attrs.frozen
class APIError(Exception):
    """An error the API reports to the caller as is."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", "NotFoundError", "model_not_found", "model")


def from_chameleon(exc: ce.ChameleonError) -> APIError:
    """The status a library error deserves; the message is the library's own."""
    message = str(exc)
    if isinstance(exc, ce.EngineOverloadedError):
        return APIError(429, message, "rate_limit_error", "engine_overloaded")
    if isinstance(exc, ce.AdapterNotFoundError):
        return APIError(404, message, "NotFoundError", "model_not_found", "model")
    if isinstance(exc, ce.AdapterExistsError):
        return APIError(400, message, code="adapter_exists", param="lora_name")
    if isinstance(exc, ce.AdapterInUseError):
        return APIError(409, message, "conflict_error", "adapter_in_use", "lora_name")
    if isinstance(exc, (ce.InvalidSamplingParamsError, ce.InvalidRequestError)):
        return APIError(400, message, code=type(exc).__name__)
    if isinstance(exc, (ce.AdapterError, ce.ModelLoadError)):
        return APIError(400, message, code=type(exc).__name__, param="lora_path")
    if isinstance(exc, ce.EngineClosedError):
        return APIError(503, message, "service_unavailable", "engine_closed")
    return APIError(500, message, "internal_error", type(exc).__name__)
