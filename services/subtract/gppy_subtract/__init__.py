"""gppy subtract stage: PSF-matched difference imaging of stacks against a reference.

Science modules (pure: arrays and headers in, arrays and headers out):

``backend``   the FFT module that goes with the array backend (NumPy or CuPy)
``kernel``    Alard-Lupton Gaussian-Hermite kernel basis, spatial polynomials, kernel solutions
``stamps``    star detection in both images, PSF sizes, isolated/unsaturated/unmasked stamps
``solve``     normal equations over the stamps, iterative stamp rejection
``convolve``  FFT convolution with a spatially varying kernel, tile-wise noise convolution,
              mask growth
``engine``    the native engine: direction choice, regions, difference, noise and mask images
``reference`` reference choice (v1 rules), grid comparison and reprojection onto the science grid
``products``  headers of the products (science keys carried over, quality keys)
``hotpants``  the optional HOTPANTS engine (v1's command line), used only when the binary exists

``service`` is the thin NATS service (``python -m gppy_subtract``).
"""
