"""One exception type per failure family, each with a message that says what is wrong."""


class Doc2AtomError(Exception):
    """Base class of every error raised by vllm_doc2atom."""


class BankError(Doc2AtomError):
    """An atom bank is missing, malformed, corrupt, or does not fit the base model.

    `kind` names the failure family so the server can map it to an HTTP status: "not_found" (404),
    "bad_request" (400: the request names banks it may not), "mismatch" (409: the bank does not fit
    the served model or encoder), "invalid" (422: the bank on disk is malformed or corrupt), and
    "stale" (the bank changed on disk under a reader: reload it and retry).
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind
