"""Typed errors: each names the field, file or row it is about; only the CLI maps them to exit codes."""


def first_line(e: BaseException | str | None, limit: int = 500) -> str:
    """The first non-blank line of an error (or message): what a one-line report quotes of it."""
    lines = [ln.strip() for ln in str(e or "").splitlines() if ln.strip()]
    if lines:
        return lines[0][:limit]
    return type(e).__name__ if isinstance(e, BaseException) else ""


def key_path(parts, root: str = "") -> str:
    """Where a value sits, as the messages name it: `workers[0].model`, or `$.items[2]` under root `$`."""
    out = root
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class RunnerError(Exception):
    """Base of every error a user can cause or fix."""

    exit_code = 1


class SpecError(RunnerError):
    """The job spec is malformed: a bad key, type or value."""

    exit_code = 2


class InputError(RunnerError):
    """The input data is missing or not what the spec says."""

    exit_code = 3


class ModelError(RunnerError):
    """A model file is missing or unreadable."""

    exit_code = 4


class StorageError(RunnerError):
    """Reading or writing the output or input location failed."""

    exit_code = 5


class JobConflictError(RunnerError):
    """The output location already holds a different job."""

    exit_code = 6


class FencedError(JobConflictError):
    """A commit refused because another run holds the job lock now: this run's driver lost it."""


class JobFailedError(RunnerError):
    """The job ran but did not complete (too many failed rows, all workers lost)."""

    exit_code = 7


class EngineError(RunnerError):
    """An engine failed in a way that is not the fault of one row."""

    exit_code = 8


class ClusterError(RunnerError):
    """A Ray cluster cannot be reached, or its Job Submission API refused a request."""

    exit_code = 9


def short_error(e: BaseException) -> str:
    """A Ray error as one line: its cause's type and last line, without Ray's advice."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = (lines[-1] if lines else "").split(" Some common causes include")[0]  # Ray's advice is not the error
    return f"{type(e).__name__}: {text}"[:500]
