"""``python -m gppy_calib``: run the calibration service."""

from gppy_calib.service import main

main()
