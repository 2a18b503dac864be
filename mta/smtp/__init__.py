"""The SMTP front end: listeners, sessions and the replies they send."""
