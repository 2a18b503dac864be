"""The durable mail queue, as a library that knows files, states and fsync.

It knows nothing of SMTP: a message is raw bytes plus a metadata record
(sender, recipients with their state and last reply, attempts, times).
See ``spool.store`` for the on-disk layout and the durability protocol.
"""

from spool.errors import SpoolError, SpoolLocked
from spool.record import Recipient, Record
from spool.store import LoadResult, Spool

__all__ = ["LoadResult", "Recipient", "Record", "Spool", "SpoolError", "SpoolLocked"]
