"""gppy phot stage service."""
