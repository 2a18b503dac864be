"""The HTTP send API: JSON or raw RFC 5322 submissions over HTTP(S), into the same intake as SMTP.

``server`` owns the listener and the routes, ``keys`` the API keys,
``compose`` the JSON-to-MIME builder, ``errors`` the JSON error bodies,
``idempotency`` the store of Idempotency-Key answers.
"""
