"""The one error type a user sees: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input: unknown model or GPU, a bad size, an unreadable or incomplete file.

    The message is the whole story: one line that names the problem and, where there is one, the fix.
    """


def require_extra(module: str, extra: str):
    """Import an optional heavy dependency, or raise a UserError that names the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise UserError(
            f"{module} is not installed ({exc}); install it with: pip install -e '.[{extra}]'"
        ) from None
