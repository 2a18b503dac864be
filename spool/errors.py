"""Errors the spool raises; callers map them to replies or messages."""


class SpoolError(Exception):
    """A spool operation could not be made durable; nothing of it was kept."""


class SpoolLocked(SpoolError):
    """Another process owns this spool directory."""


class UnknownMessage(SpoolError):
    """No message with that id is in the spool."""
