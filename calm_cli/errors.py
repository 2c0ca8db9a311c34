"""One root for calm's errors. Each carries a stable `code` (a record's error.code, an HTTP error's type) and the
command line's exit status, so fronts decide by type and never by the message's text.

The loop falls back to the next candidate member on a MemberFailure and on nothing else: a request that is
itself wrong (BadRequest, PromptTooLong) fails the same way on every member.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2

ERROR_CODES = ("bad_json", "bad_request", "bad_utf8", "too_large", "prompt_too_long", "model_failed", "timeout",
               "queue_full", "unavailable", "internal")


class CalmError(Exception):
    """Something calm could not do, said in one line. `code` names the kind for records and clients."""

    code = "internal"
    exit_code = EXIT_FAILED


class UsageError(CalmError):
    """The user's input (a flag, a file, a setting) is wrong; the message says which and why."""

    code = "bad_request"
    exit_code = EXIT_USAGE


class BadRequest(UsageError):
    """A request calm cannot answer as asked (an unknown member, an empty prompt...)."""


class PromptError(BadRequest):
    """A prompt a model cannot take: empty, or not UTF-8."""


class PromptTooLong(PromptError):
    """The prompt and the tokens asked for exceed the model's context window (or a batch slot)."""

    code = "prompt_too_long"


class MemberFailure(CalmError):
    """A member could not answer this time (it cannot be loaded, does not fit, failed while running, its server
    is down): the loop tries the next candidate and counts it against the member."""

    code = "model_failed"


class ModelsFailed(MemberFailure):
    """Every candidate member failed; the message names each failure."""


class QueueFull(CalmError):
    """More requests wait than the policy's queue.max_waiting allows."""

    code = "queue_full"


class Timeout(CalmError):
    """A request waited longer than the policy's queue.timeout_s."""

    code = "timeout"


class ShuttingDown(CalmError):
    """calm is stopping: a request read but not yet answered is refused, never dropped."""

    code = "unavailable"
