"""gppy watcher stage service."""
