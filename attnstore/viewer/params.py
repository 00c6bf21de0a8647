"""A request to the viewer's API: its integer parameters, checked, and the refusal (:class:`ApiError`)."""

from __future__ import annotations

__all__ = ["ApiError", "int_param"]


class ApiError(Exception):
    """A request the API refuses: HTTP status and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def int_param(
    params: dict[str, str],
    name: str,
    default: int | None = None,
    lo: int | None = None,
    hi: int | None = None,
) -> int:
    raw = params.get(name)
    span = f" in {lo}…{hi}" if lo is not None and hi is not None else ""
    if raw is None or raw == "":
        if default is None:
            raise ApiError(400, f"Expected parameter {name!r} (an integer{span}). Got nothing.")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, f"Expected parameter {name!r} as an integer{span}. Got {raw[:40]!r}."
        ) from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"Expected parameter {name!r}{span or ' in range'}. Got {value}.")
    return value
