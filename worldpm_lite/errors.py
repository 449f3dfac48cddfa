"""The package's own errors: the ones that mean "your input is wrong".

Every error a user can cause and fix (a bad flag, a damaged checkpoint, a bad input line, an output
that already exists, an interrupted run resumed with other settings) is an `InputError`. Its message
names the file, the field and what was expected, so the command line prints it as one line and exits
2. Anything else that escapes a command is a bug: the command line shows its traceback and exits 1.

InputError is a ValueError (callers that catch ValueError keep working); OutputExists and NotFound
are also FileExistsError and FileNotFoundError. Imports nothing: every layer may raise these.
"""


class InputError(ValueError):
    """The input (a flag, a file, a request, a setting) is wrong; the message says where and why."""


class UsageError(InputError):
    """A command-line flag or an argument of a public function has a value it cannot take."""


class OutputExists(InputError, FileExistsError):
    """An output (or an interrupted run's staging) is already there and would be overwritten."""


class NotFound(InputError, FileNotFoundError):
    """A file or folder the command needs is not there."""


def require_extra(extra: str, *modules: str, what: str, error: type[InputError] = UsageError) -> None:
    """`error` (a UsageError by default) naming `extra` when one of `modules` cannot be imported: `what`
    needs pip install 'worldpm-lite[extra]'. The one place the optional extras are checked."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise error(f"{what} needs the [{extra}] extra ({name} is not installed): pip install "
                             f"'worldpm-lite[{extra}]'") from None
