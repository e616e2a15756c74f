"""gppy astrometry stage service."""
