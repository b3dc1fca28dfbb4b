"""One exception type per failure family, each with a message that says what is wrong."""

from __future__ import annotations

from enum import StrEnum


class Doc2AtomError(Exception):
    """Base class of every error raised by vllm_doc2atom."""


class BankErrorKind(StrEnum):
    """Why a bank cannot be used, and the HTTP status a server answers that with."""

    NOT_FOUND = "not_found", 404
    BAD_REQUEST = "bad_request", 400  # the request names banks it may not (or not together)
    MISMATCH = "mismatch", 409  # the bank does not fit the served model or encoder
    INVALID = "invalid", 422  # the bank on disk is malformed or corrupt
    STALE = "stale", 409  # the bank changed on disk under a reader: reload it and retry

    def __new__(cls, value: str, http_status: int) -> BankErrorKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.http_status = http_status
        return member


class BankError(Doc2AtomError):
    """An atom bank is missing, malformed, corrupt, or does not fit the base model."""

    def __init__(self, message: str, kind: BankErrorKind = BankErrorKind.INVALID) -> None:
        super().__init__(message)
        self.kind = BankErrorKind(kind)


class RequestError(Doc2AtomError):
    """A request the plugin cannot serve; answered as an OpenAI-style error with this status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
