"""``python -m gppy_phot``: run the phot stage service."""

from gppy_phot.service import main

if __name__ == "__main__":
    main()
