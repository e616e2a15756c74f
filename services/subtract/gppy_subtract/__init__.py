"""gppy subtract stage service."""
