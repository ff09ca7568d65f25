"""How an error is told in one line, wherever a message must fit one: a status, a fallback's warning, a refusal."""

FIRST_LINE_LIMIT = 300


def first_line(error: BaseException) -> str:
    """The error's message as one line (its first, at most FIRST_LINE_LIMIT characters), or its type's name when the
    message says nothing."""
    lines = str(error).strip().splitlines()
    return lines[0][:FIRST_LINE_LIMIT] if lines else type(error).__name__


def describe_error(error: BaseException) -> str:
    """The error's type and first line, for messages where the type says what went wrong (a library's failure)."""
    message = first_line(error)
    name = type(error).__name__
    return name if message == name else f"{name}: {message}"
