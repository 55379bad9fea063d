"""One exception type for bad input, with one-line messages, and a helper to unwrap it.

Errors raised inside Ray tasks reach the driver wrapped (``RayTaskError``, Ray Data's
``UserCodeException``); :func:`find_user_error` digs the original out so the CLI can print
the one line a user needs instead of a remote traceback.
"""

from __future__ import annotations


class EzSASRecError(ValueError):
    """Bad input or configuration. The message is one line naming the file/column/field."""

    def __init__(self, message: str):
        self.message = " ".join(str(message).split())
        super().__init__(self.message)


class PrepareError(EzSASRecError):
    """A raw log or prepare option that cannot be used."""


def find_user_error(exc: BaseException) -> EzSASRecError | None:
    """Return the :class:`EzSASRecError` behind ``exc`` (itself, a cause, or a Ray wrapper)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        inner = getattr(err, "cause", None)
        if isinstance(err, EzSASRecError) and not isinstance(inner, EzSASRecError):
            return err
        stack.extend([getattr(err, "cause", None), err.__cause__, err.__context__])
        # RayTaskError(X) subclasses X when it can; its args may carry the original too.
        stack.extend(a for a in getattr(err, "args", ()) if isinstance(a, BaseException))
    return None


def quiet_ray_data_errors():
    """Keep Ray Data from logging remote tracebacks of errors we report in one line."""
    import logging

    class _DropErrors(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return record.levelno < logging.ERROR and not message.startswith(
                ("Failed to apply UDF", "To change retry attempts"))

    for name in ("ray.data", "ray.data._internal.execution.streaming_executor_state",
                 "ray.data.exceptions"):
        logging.getLogger(name).addFilter(_DropErrors())
