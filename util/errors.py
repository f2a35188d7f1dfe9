"""The errors a user can act on. Library code raises them, naming the file, row or flag at fault; only the
mains' entry code turns one into a single line on stderr and exit status 1 (`util.cli.exit_on_user_errors`),
so that a library function never ends the process of whoever called it (a recipe, a test, a notebook)."""


class VolMAEError(Exception):
    """Base of every error whose message alone tells the user what to change."""


class UsageError(VolMAEError, ValueError):
    """Flags that cannot work, alone or together; the message names the flag."""


class DataError(VolMAEError, ValueError):
    """Input data that cannot be used as given; the message names the file or row."""


class FolderInUseError(VolMAEError, RuntimeError):
    """An output folder held by another live run."""


class DivergedError(VolMAEError, ArithmeticError):
    """Training reached a non-finite loss; the message says where, and which setting to lower."""
