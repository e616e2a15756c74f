"""Train the vetting score of the transient search (gppy_phot.vetting) on simulated nights.

    python scripts/train_vetting.py build OUTDIR SEED [SEED ...]   # nights -> OUTDIR/seed<N>.npz
    python scripts/train_vetting.py fit OUTDIR [--out MODEL.json] [--exclude 21]

``build`` runs simulated nights through the pipeline's science (``tests/conftest_phot.run_sim_night``:
stacks, native subtraction, transient search with the trained score switched off, so that the
labels do not depend on an earlier model) and labels every detection of every difference
against the simulator's truth (:func:`label_detections`). ``fit`` (needs scikit-learn, the
``train`` extra) fits gradient-boosted trees on every night except the excluded seeds (the
CI test's night), reports detection-level figures of three-fold cross-validation by night
(each fold's nights left out of its fit; kept = a candidate by the score thresholds of
``TransientParams``) and writes the trees as plain arrays for
:func:`gppy_phot.vetting.score`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: The seeds of the nights the tests measure: never trained on.
TEST_SEEDS = (21,)
#: Detections that are candidates whatever the score is are not the model's concern; neither
#: are those the hard flags veto.
HARD = ("flag_edge", "flag_footprint", "flag_inv_ref", "flag_pm_star")
TREE_PARAMS = {"max_iter": 200, "learning_rate": 0.05, "max_leaf_nodes": 15, "l2_regularization": 1.0,
               "random_state": 0}


def _conftest_phot():
    spec = importlib.util.spec_from_file_location("conftest_phot", ROOT / "tests" / "conftest_phot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("conftest_phot", mod)
    spec.loader.exec_module(mod)
    return mod


def label_detections(ev: dict) -> np.ndarray:
    """Per detection of ``ev["cat"]`` (:func:`conftest_phot.evaluate_difference`): 1 within the
    match radius of an injected transient (3 times it for the moving object), 0 beyond 1.5 FWHM
    (and the match radius) of all of them and of the moving object's track, -1 in between."""
    cat = ev["cat"]
    n = len(cat)
    ra = np.asarray(cat["ALPHA_J2000"], float)
    dec = np.asarray(cat["DELTA_J2000"], float)
    match = float(ev["match_arcsec"])
    assoc = float(ev["assoc_arcsec"])
    lab = np.zeros(n, int)
    near_any = np.zeros(n, bool)

    def dist(a0, d0):
        return np.hypot((ra - a0) * np.cos(np.radians(d0)), dec - d0) * 3600

    for r in ev["rows"]:
        d = dist(r["ra"], r["dec"])
        lab[d < (3 * match if r["kind"] == "moving" else match)] = 1
        near_any |= d < assoc
        if r.get("track"):
            (a0, d0), (a1, d1) = r["track"]
            for t in np.linspace(0, 1, 9):
                near_any |= dist(a0 + t * (a1 - a0), d0 + t * (d1 - d0)) < assoc
    lab[(lab == 0) & near_any] = -1
    return lab


def night_dataset(runs: list[dict], truth_dir: Path, cp) -> dict[str, np.ndarray]:
    """The vetting features, labels and bookkeeping of every detection of a night's differences."""
    from gppy_phot import vetting

    parts = []
    for e in runs:
        if e["event"] is None:
            continue
        ev = cp.evaluate_difference(e, truth_dir)
        cat = ev["cat"]
        if len(cat) == 0:
            continue
        hard = np.zeros(len(cat), bool)
        for f in HARD:
            if f in cat.colnames:
                hard |= np.asarray(cat[f], bool)
        parts.append({"x": vetting.feature_matrix({f: np.asarray(cat[f"vet_{f}"], float) for f in vetting.FEATURES}),
                      "label": label_detections(ev), "hard": hard, "visit": np.full(len(cat), e["visit"]["index"]),
                      "area": np.full(len(cat), ev["area_px"])})
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def build(outdir: Path, seeds: list[int], n_transients: int) -> None:
    os.environ["GPPY_PHOT_VETTING_MODEL"] = "false"
    cp = _conftest_phot()
    outdir.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        pj, runs = cp.run_sim_night(outdir / f"seed{seed}", seed, n_transients=n_transients)
        with open(outdir / f"seed{seed}" / "runs.pkl", "wb") as fh:    # to measure the night again
            pickle.dump((pj, runs), fh)
        data = night_dataset(runs, pj.parent / "truth", cp)
        np.savez(outdir / f"seed{seed}.npz", seed=seed, **data)
        print(f"seed {seed}: {len(data.get('label', []))} detections", flush=True)


def export_trees(clf) -> dict:
    """A fitted binary HistGradientBoostingClassifier as plain arrays (gppy_phot.vetting)."""
    trees = []
    for (pred,) in clf._predictors:
        nd = pred.nodes
        trees.append({"feature": nd["feature_idx"].astype(int).tolist(),
                      "threshold": [float(v) for v in nd["num_threshold"]],
                      "left": nd["left"].astype(int).tolist(), "right": nd["right"].astype(int).tolist(),
                      "leaf": nd["is_leaf"].astype(bool).tolist(),
                      "missing_left": nd["missing_go_to_left"].astype(bool).tolist(),
                      "value": [float(v) for v in nd["value"]], "depth": int(nd["depth"].max())})
    return {"baseline": float(np.ravel(clf._baseline_prediction)[0]), "trees": trees}


def fit(outdir: Path, out: Path, exclude: list[int]) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from gppy_phot import vetting
    from gppy_phot.transients import TransientParams

    tp = TransientParams()
    nights = {}
    for p in sorted(outdir.glob("seed*.npz")):
        d = dict(np.load(p))
        if int(d["seed"]) not in exclude and len(d.get("label", [])):
            nights[int(d["seed"])] = d
    seeds = sorted(nights)
    use = {s: (nights[s]["label"] >= 0) & ~nights[s]["hard"] for s in seeds}

    def stack(ss):
        x = np.vstack([nights[s]["x"][use[s]] for s in ss])
        y = np.concatenate([nights[s]["label"][use[s]] for s in ss])
        return x, y

    folds = [seeds[k::3] for k in range(3)]
    record = []
    for k, test in enumerate(folds):
        train = [s for s in seeds if s not in test]
        clf = HistGradientBoostingClassifier(**TREE_PARAMS).fit(*stack(train))
        x, y = stack(test)
        p = clf.predict_proba(x)[:, 1]
        snr = x[:, vetting.FEATURES.index("snr_stat")]
        real = y == 1
        kept = (p >= np.where(snr >= tp.high_snr, tp.rb_min_high_snr, tp.rb_min)) & (snr >= tp.snr_min)
        record.append({"fold": k, "test_seeds": test, "real": int(real.sum()), "bogus": int((~real).sum()),
                       "real_kept_snr10": round(float(np.mean(kept[real & (snr >= 10)])), 4),
                       "real_kept_snr5_10": round(float(np.mean(kept[real & (snr >= 5) & (snr < 10)])), 4),
                       "bogus_kept": int(np.sum(kept & ~real))})
        print(record[-1], flush=True)
    clf = HistGradientBoostingClassifier(**TREE_PARAMS).fit(*stack(seeds))
    model = export_trees(clf)
    x, _ = stack(seeds)
    assert np.allclose(vetting.score(x, {**model, "features": list(vetting.FEATURES)}), clf.predict_proba(x)[:, 1],
                       atol=1e-6), "exported trees disagree with scikit-learn"
    model.update({"features": list(vetting.FEATURES), "rb_min": tp.rb_min, "rb_min_high_snr": tp.rb_min_high_snr,
                  "train_seeds": seeds,
                  "excluded_seeds": exclude, "params": TREE_PARAMS, "cross_validation": record})
    out.write_text(json.dumps(model, separators=(",", ":")))
    print(f"wrote {out}: {len(model['trees'])} trees, {len(seeds)} nights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("outdir", type=Path)
    b.add_argument("seeds", type=int, nargs="+")
    b.add_argument("--transients", type=int, default=16)
    f = sub.add_parser("fit")
    f.add_argument("outdir", type=Path)
    f.add_argument("--out", type=Path, default=ROOT / "services/phot/gppy_phot/vetting_model.json")
    f.add_argument("--exclude", type=int, nargs="*", default=list(TEST_SEEDS))
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.outdir, a.seeds, a.transients)
    else:
        fit(a.outdir, a.out, a.exclude)


if __name__ == "__main__":
    main()
