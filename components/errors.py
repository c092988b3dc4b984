"""Errors a user fixes (a setting, an argument, an input), as opposed to defects.

The command line prints their message as one line and exits with a usage code; the
message names the setting or argument and what is allowed.
"""


class UserError(ValueError):
  """A configuration, argument or input value to fix; the message says which and how."""


class SourceError(RuntimeError):
  """The data source failed or refused (database unreachable, wrong password, gone mid-read,
  too many dead letters): the message starts with what failed and says what to check."""


class BusyError(RuntimeError):
  """Another carvision process holds the output or pipeline root this one would write: the
  message names it and the process; nothing was written."""
