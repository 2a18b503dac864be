"""What operators see: event logs and the health endpoints."""
