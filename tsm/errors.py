"""The one exception type `tsm` raises for bad input: its message is a single line saying what to do."""


class TsmError(ValueError):
    """Bad input at a boundary (spec, config, timestep, file). The CLI prints it as one line."""


def shorten(text: str, limit: int = 60) -> str:
    """``text`` as it may appear in a one-line message: its first ``limit`` characters and its length when
    longer (a 10,000-character prompt must not fill the terminal)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"
