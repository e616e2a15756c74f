"""gppy calib stage service."""
