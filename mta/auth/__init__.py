"""SMTP AUTH: who a client is (credentials) and how guessing is slowed (throttle)."""
