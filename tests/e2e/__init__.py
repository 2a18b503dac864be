"""End-to-end tests: kubemta in a small internet of network namespaces."""
