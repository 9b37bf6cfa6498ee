"""The one exception type for mistakes a user can make (bad path, bad config,
missing stage, corrupt file). The CLI prints its message as one line and exits
with code 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 2
