"""kubemta: a self-hosted SMTP mail transfer agent made to run in Kubernetes."""

__version__ = "0.1.0"
