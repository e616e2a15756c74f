"""gppy stack stage service."""
