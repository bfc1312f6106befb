"""The one exception type `tsm` raises for bad input: its message is a single line saying what to do."""


class TsmError(ValueError):
    """Bad input at a boundary (spec, config, timestep, file). The CLI prints it as one line."""
