"""Stand-ins for what cannot run on a test machine (the Kubernetes API server)."""
