"""One error hierarchy for the whole toolkit; the CLI maps each class to an exit code in one place."""


class ZooError(Exception):
    """Base class: the message is one line a user can act on."""

    exit_code = 2


class BadInput(ZooError):
    """The request itself is wrong (path, name, format, option); nothing was changed."""


class NotFound(ZooError):
    """A model, version, alias or blob that was asked for does not exist."""


class Corrupted(ZooError):
    """Stored content no longer matches its hash, or the registry's schema cannot be used."""

    exit_code = 1


class SchemaMismatch(ZooError):
    """The database was made by another schema version (newer, or not a modelzoo registry)."""
