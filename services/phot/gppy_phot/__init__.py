"""gppy phot stage: calibrated photometry of singles and stacks, transients on differences.

Science modules (pure, or wrappers of Source Extractor): :mod:`.seeing` (PSF from reference
stars), :mod:`.apertures` (v1's aperture set), :mod:`.sextractor` (configuration and runs),
:mod:`.matching`, :mod:`.zeropoint` (per-aperture and total zero points), :mod:`.depth`
(limiting magnitudes, noise correlation), :mod:`.catalog` (``.phot.cat``), :mod:`.plots`,
:mod:`.regions`, :mod:`.transients` (forced measurements, vetting flags, labels, moving
objects), :mod:`.realbogus` (score; fitted by :mod:`.rb_train`), :mod:`.cutouts`. The steps
for one image are in :mod:`.photometry` and for a difference in :mod:`.transient_products`;
:mod:`.service` is the NATS service. :mod:`.synthetic` makes small skies with known truth for
tests and benchmarks.
"""
