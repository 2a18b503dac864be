"""SMTP TLS Reporting (RFC 8460): what direct delivery's TLS sessions did, per policy domain and day.

``record`` keeps the counts on the spool volume; ``report`` turns one
domain's day into the aggregate JSON report and its mail; ``send`` finds
the domain's ``rua`` endpoints and delivers the reports once a day.
"""
