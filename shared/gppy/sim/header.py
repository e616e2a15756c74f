"""Raw 7DT-like FITS headers (as written by the unit's camera control software)."""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.time import Time, TimeDelta

from gppy.sim import instrument as ins

#: IMAGETYP spellings (changehdr.dat maps every one of them); the first is the camera's.
IMAGETYP = {
    "science": ["Light Frame", "LIGHT", "Light"],
    "bias": ["Bias Frame", "BIAS", "zero"],
    "dark": ["Dark Frame", "DARK", "Dark"],
    "flat": ["Flat Field", "FLAT", "Flat"],
}


def sexagesimal_ra(ra_deg: float) -> str:
    """``'HH MM SS.SS'`` (space-separated, as OBJCTRA)."""
    h = (ra_deg % 360.0) / 15.0
    hh = int(h)
    mm = int((h - hh) * 60)
    ss = ((h - hh) * 60 - mm) * 60
    if ss >= 59.995:
        ss, mm = 0.0, mm + 1
    if mm >= 60:
        mm, hh = 0, (hh + 1) % 24
    return f"{hh:02d} {mm:02d} {ss:05.2f}"


def sexagesimal_dec(dec_deg: float) -> str:
    """``'+DD MM SS.S'`` (space-separated, as OBJCTDEC)."""
    sign = "-" if dec_deg < 0 else "+"
    d = abs(dec_deg)
    dd = int(d)
    mm = int((d - dd) * 60)
    ss = ((d - dd) * 60 - mm) * 60
    if ss >= 59.95:
        ss, mm = 0.0, mm + 1
    if mm >= 60:
        mm, dd = 0, dd + 1
    return f"{sign}{dd:02d} {mm:02d} {ss:04.1f}"


def local_sidereal_deg(t: Time, lon_deg: float = ins.SITE_LON) -> float:
    """Local mean sidereal time (deg) from the IAU GMST linear formula (ample for airmass)."""
    gmst = 280.46061837 + 360.98564736629 * (t.jd - 2451545.0)
    return float((gmst + lon_deg) % 360.0)


def alt_az(ra: float, dec: float, t: Time) -> tuple[float, float]:
    """Altitude and azimuth (deg, azimuth from north through east) at the site."""
    ha = np.deg2rad(local_sidereal_deg(t) - ra)
    lat, d = np.deg2rad(ins.SITE_LAT), np.deg2rad(dec)
    sin_alt = np.sin(lat) * np.sin(d) + np.cos(lat) * np.cos(d) * np.cos(ha)
    alt = np.arcsin(sin_alt)
    az = np.arctan2(-np.cos(d) * np.sin(ha), np.sin(d) * np.cos(lat) - np.cos(d) * np.sin(lat) * np.cos(ha))
    return float(np.rad2deg(alt)), float(np.rad2deg(az) % 360.0)


def airmass(alt_deg: float) -> float:
    """Airmass (Pickering 2002)."""
    h = max(alt_deg, 1.0)
    return float(1.0 / np.sin(np.deg2rad(h + 244.0 / (165.0 + 47.0 * h ** 1.1))))


def utc_offset_hours(t: Time) -> int:
    """Chile: UTC-3 in the southern summer (Sep-Mar), UTC-4 otherwise (simplified)."""
    return -3 if t.datetime.month in (9, 10, 11, 12, 1, 2, 3) else -4


def raw_header(*, unit: str, kind: str, obj: str, filt: str, exptime: float, date_obs: Time,
               ra: float | None, dec: float | None, obj_ra: float | None = None,
               obj_dec: float | None = None, spelling: int = 0, ccd_temp: float = ins.CCD_TEMP,
               seq: int = 0) -> fits.Header:
    """Header of a raw frame.

    ``ra``/``dec`` (deg) are the pointing the mount reports (RA, DEC, CENTALT, ...);
    ``obj_ra``/``obj_dec`` the target's catalogue position (OBJCTRA/OBJCTDEC); None for
    calibration frames.
    """
    h = fits.Header()
    names = IMAGETYP[kind]
    h["IMAGETYP"] = (names[spelling % len(names)], "Type of exposure")
    h["EXPOSURE"] = (float(exptime), "[s] Exposure duration")
    h["EXPTIME"] = (float(exptime), "[s] Exposure duration")
    loc = date_obs + TimeDelta(utc_offset_hours(date_obs) * 3600.0, format="sec")
    h["DATE-LOC"] = (loc.isot, "Time of observation (local)")
    h["DATE-OBS"] = (date_obs.isot, "Time of observation (UTC)")
    h["JD"] = (round(date_obs.jd, 8), "Julian date of the start of the exposure")
    h["MJD"] = (round(date_obs.mjd, 8), "Modified Julian date of the start")
    h["XBINNING"] = (1, "X axis binning factor")
    h["YBINNING"] = (1, "Y axis binning factor")
    h["GAIN"] = (ins.GAIN_SETTING, "Sensor gain (camera setting, not e-/ADU)")
    h["OFFSET"] = (0, "Sensor gain offset")
    h["EGAIN"] = (ins.EGAIN, "Electronic gain in e-/ADU")
    h["XPIXSZ"] = (ins.PIXEL_SIZE_UM, "[um] Pixel X axis size")
    h["YPIXSZ"] = (ins.PIXEL_SIZE_UM, "[um] Pixel Y axis size")
    h["INSTRUME"] = (ins.INSTRUMENT, "Imaging instrument name")
    h["SET-TEMP"] = (ins.CCD_TEMP, "[degC] CCD temperature setpoint")
    h["CCD-TEMP"] = (round(ccd_temp, 2), "[degC] CCD temperature")
    h["READOUTM"] = ("16-bit", "Sensor readout mode")
    h["SATURATE"] = (float(ins.ADC_MAX), "[ADU] raw ADC ceiling")
    h["TELESCOP"] = (unit, "Name of telescope")
    h["FOCALLEN"] = (ins.FOCAL_LENGTH_MM, "[mm] Focal length")
    h["FOCRATIO"] = (ins.FOCAL_RATIO, "Focal ratio")
    if ra is not None and dec is not None:
        alt, az = alt_az(ra, dec, date_obs)
        h["RA"] = (round(ra, 6), "[deg] RA of telescope")
        h["DEC"] = (round(dec, 6), "[deg] Declination of telescope")
        h["CENTALT"] = (round(alt, 4), "[deg] Altitude of telescope")
        h["CENTAZ"] = (round(az, 4), "[deg] Azimuth of telescope")
        h["AIRMASS"] = (round(airmass(alt), 5), "Airmass at frame center (Pickering 2002)")
    h["PIERSIDE"] = ("West", "Telescope pointing state")
    h["SITEELEV"] = (ins.SITE_ELEV, "[m] Observation site elevation")
    h["SITELAT"] = (ins.SITE_LAT, "[deg] Observation site latitude")
    h["SITELONG"] = (ins.SITE_LON, "[deg] Observation site longitude")
    h["FWHEEL"] = ("7DT filter wheel", "Filter Wheel name")
    h["FILTER"] = (filt, "Active filter name")
    h["OBJECT"] = (obj, "Name of the object of interest")
    if obj_ra is not None and obj_dec is not None:
        h["OBJCTRA"] = (sexagesimal_ra(obj_ra), "[H M S] RA of imaged object")
        h["OBJCTDEC"] = (sexagesimal_dec(obj_dec), "[D M S] Declination of imaged object")
        h["OBJCTROT"] = (0.0, "[deg] planned rotation of imaged object")
    h["FOCNAME"] = ("Focuser", "Focusing equipment name")
    h["FOCPOS"] = (12000 + seq % 7, "[step] Focuser position")
    h["FOCUSPOS"] = (12000 + seq % 7, "[step] Focuser position")
    h["FOCUSSZ"] = (1.0, "[um] Focuser step size")
    h["ROWORDER"] = ("BOTTOM-UP", "FITS Image Orientation")
    h["EQUINOX"] = (2000.0, "Equinox of celestial coordinate system")
    h["SWCREATE"] = ("gppy-sim", "Software that created this file")
    return h
