"""python -m gppy_astrometry"""

from gppy_astrometry.service import main

main()
