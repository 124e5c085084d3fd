"""Error types shared by every layer of the package.

`ParityError` is a user/input error: the CLI prints its message on one line and exits 2. A parity *failure*
(tensors differ) is not an exception; commands report it and exit 1.
"""


class ParityError(Exception):
    """Bad input or usage. The message must name the file, tensor or field at fault."""

    exit_code = 2
