"""DKIM: signing keys from files, and signing outgoing mail (RFC 6376, RFC 8463)."""
