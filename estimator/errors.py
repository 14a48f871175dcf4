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
    except ImportError as exc:
        # not installed at all (the module itself is missing), or installed but broken (a missing
        # shared library, a dependency of it): the second says what the import said
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or module).split(".")[0] == module.split(".")[0]
        problem = "is not installed" if missing else f"cannot be imported ({' '.join(str(exc).split())[:200]})"
        raise UserError(
            f"{module} {problem}; install the {extra} extra: pip install 'vramcal[{extra}]' "
            f"(in a source checkout: pip install -e '.[{extra}]')"
        ) from None
