"""The real stack in Docker: the six stage images built from this tree, compose.yaml as it is.

A simulated night (gppy.sim, small frames) lies in the data root when the stack starts; the
watcher finds it and the night runs to its night-done event; the products are checked against
the simulator's truth. Then subtraction is held (``stop subtract``), a second night is
dropped into the data root, and once its stacks wait for subtraction two subtract replicas
start and are replaced by a newly built image (a new tag) while they hold messages: the night
finishes with every stack subtracted exactly once. Finally ``docker compose down`` + ``up``:
the stream, the consumers and the watcher's ledger (a JetStream KV bucket) survive, and no
night is queued again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

sys.path.insert(0, str(Path(__file__).parent))

from conftest_compose import (  # noqa: E402
    GID,
    STAGES,
    TAG,
    UID,
    ComposeStack,
    build_images,
    chown_tree,
    image_env,
    make_data_root,
    remove_stale_projects,
    require_engine,
    stream_subjects,
    wait_for,
)

from gppy import bus, naming  # noqa: E402
from gppy.messages import NightReady, parse  # noqa: E402

pytestmark = [pytest.mark.docker]

UNIT = "7DT01"
NIGHT1 = "2025-01-15"
NIGHT2 = "2025-01-16"
# Two targets (a tile with a 7DT reference and a named field with a PS1-like one), one filter:
# two visits, so two stacks per night for two subtract replicas.
SIM = dict(unit=UNIT, targets=2, filters=["m650"], size=(1024, 768), extras=False, n_transients=4)
SEED1, SEED2 = 11, 12  # night 2 observes another tile (its own references, sky grid and truth)
NIGHT_TIMEOUT_S = float(os.environ.get("GPPY_TEST_NIGHT_TIMEOUT", "1200"))
SWAP_TAG = f"{TAG}-swap"
WCS_TOLERANCE_ARCSEC = 0.5  # SCAMP lands within ~0.05" of the truth here; a wrong solution is off by arcminutes


def simulate(root: Path, night: str, seed: int) -> Path:
    """Simulate a night (raw frames, references, sky grid, truth) into ``root``."""
    from gppy.sim import simulate as sim

    return Path(sim(root, night=night, seed=seed, **SIM))


def install_night1(data: Path, sim1: Path) -> None:
    """The data root as night 1's simulation made it, with path.json pointing at ``data`` and a
    short quiet period for the watcher."""
    shutil.copytree(sim1 / "factory", data / "factory")
    shutil.copytree(sim1 / "obsdata", data / "obsdata")
    cfg = json.loads((sim1 / "path.json").read_text())
    for key, value in list(cfg.items()):
        if isinstance(value, str) and value.startswith(str(sim1)):
            cfg[key] = str(data) + value[len(str(sim1)):]
    cfg.setdefault("settings", {}).update(quiet_period_s=5.0, poll_interval_s=2.0)
    (data / "path.json").write_text(json.dumps(cfg, indent=1))
    chown_tree(data)


def drop_night2(data: Path, sim2: Path) -> Path:
    """Night 2's references and sky grid into the factory (replacing night 1's; the named field
    has the same name and another position in each simulation), then its raw folder moved into
    obsdata in one rename, as a completely copied night appears."""
    for sub in ("ref_cat", "ref_scamp", "ref_frame"):
        shutil.copytree(sim2 / "factory" / sub, data / "factory" / sub, dirs_exist_ok=True)
    tmp = data / "factory" / ".skygrid.fits.part"
    shutil.copyfile(sim2 / "factory" / "skygrid.fits", tmp)
    os.replace(tmp, data / "factory" / "skygrid.fits")
    staged = data / ".staging" / f"{NIGHT2}_gain2750"
    shutil.copytree(sim2 / "obsdata" / UNIT / staged.name, staged)
    chown_tree(data)
    dst = data / "obsdata" / UNIT / staged.name
    os.rename(staged, dst)
    return dst


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The whole stack up, with night 1 in the data root (the watcher finds it at start)."""
    require_engine()
    remove_stale_projects()
    t0 = time.monotonic()
    built_with = image_env()
    seconds = build_images(extra_env={k: built_with[k] for k in ("GPPY_VERSION", "GPPY_REVISION")})
    print(f"image build (base + 6 stages): {seconds:.1f} s")
    data = make_data_root()
    stack = None
    logs = tmp_path_factory.mktemp("compose-logs") / "pipeline-stack.log"
    try:
        for night, seed, name in ((NIGHT1, SEED1, "sim1"), (NIGHT2, SEED2, "sim2")):
            simulate(data.parent / name, night, seed)
        install_night1(data, data.parent / "sim1")
        stack = ComposeStack(data)
        stack.built_with = built_with
        stack.up()
        yield stack
    finally:
        if stack is not None:
            stack.destroy(keep_logs=logs)
        print(f"compose logs: {logs}; module time {time.monotonic() - t0:.0f} s")
        shutil.rmtree(data.parent, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers
def events(stack: ComposeStack, night_id: str | None = None, kind: str | None = None) -> list:
    async def go(js, settings):
        out = []
        for m in await stream_subjects(js, settings, f"{settings.subject_prefix}.*.>"):
            if ".dlq." in m.subject:
                continue
            ev = parse(m.data)
            if (night_id is None or ev.night_id == night_id) and (kind is None or ev.kind == kind):
                out.append(ev)
        return out

    return stack.nats(go)


def consumer(stack: ComposeStack, durable: str):
    async def go(js, settings):
        return await js.consumer_info(settings.stream, durable)

    return stack.nats(go)


def messages_on(stack: ComposeStack, subjects: list[str]) -> int:
    async def go(js, settings):
        total = 0
        for s in subjects:
            total += len(await stream_subjects(js, settings, s))
        return total

    return stack.nats(go)


def wait_night_done(stack: ComposeStack, night_id: str, timeout: float = NIGHT_TIMEOUT_S):
    def done():
        evs = events(stack, night_id, "night.done")
        return evs[-1] if evs else None

    return wait_for(done, timeout, f"night.done of {night_id}", interval=3.0)


def truth(sim_root: Path) -> dict:
    return json.loads((sim_root / "truth" / "night.json").read_text())


def expected_version() -> str:
    return image_env()["GPPY_VERSION"]


def check_products(stack: ComposeStack, night_id: str, truth_root: Path) -> None:
    """Every planned frame, stack and difference exists once, is owned by the pipeline user,
    carries the image's version, and the frames' WCS matches the simulator's truth."""
    tr = truth(truth_root)
    version = expected_version()
    evs = events(stack, night_id)
    kinds = [e.kind for e in evs]
    done = [e for e in evs if e.kind == "night.done"]
    assert len(done) == 1 and done[0].status == "done", f"{night_id}: {done}"
    plans = [e for e in evs if e.kind == "night.plan"]
    assert len(plans) == 1, f"{night_id}: {len(plans)} night plans"
    science = [f for f in tr["frames"] if f.get("kind") == "science"]
    assert len(plans[0].frames) == len(science)
    failed = [e for e in evs if e.kind == "stage.failed"]
    assert not failed, f"{night_id}: {[(e.stage, e.reason[:200]) for e in failed]}"

    def owned(path: str) -> Path:
        p = Path(path)
        assert p.exists(), path
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (UID, GID), f"{path} belongs to {st.st_uid}:{st.st_gid}"
        return p

    def owned_and_stamped(path: str) -> fits.Header:
        hdr = fits.getheader(owned(path))
        assert hdr.get("PIPEVER") == version, f"{path}: PIPEVER {hdr.get('PIPEVER')!r} != {version!r}"
        return hdr

    solved = {e.path: e for e in evs if e.kind == "frame.solved"}
    assert len(solved) == len(science) and kinds.count("frame.solved") == len(science)
    for planned in plans[0].frames:
        ev = solved[planned.calib_path]
        assert ev.ok, f"{planned.calib_path}: {ev.reason}"
        hdr = owned_and_stamped(planned.calib_path)
        owned(ev.weight_path)
        owned(ev.mask_path)
        ftruth = json.loads((truth_root / "truth" / "frames" / f"{naming.stem(Path(planned.raw_path))}.json")
                            .read_text())
        true_wcs = WCS(fits.Header.fromstring(ftruth["wcs_header"], sep="\n"))
        got_wcs = WCS(hdr)
        ny, nx = hdr["NAXIS2"], hdr["NAXIS1"]
        xs = np.array([nx / 2, 0.1 * nx, 0.9 * nx, 0.1 * nx, 0.9 * nx])
        ys = np.array([ny / 2, 0.1 * ny, 0.1 * ny, 0.9 * ny, 0.9 * ny])
        a = SkyCoord(*true_wcs.all_pix2world(xs, ys, 0), unit="deg")
        b = SkyCoord(*got_wcs.all_pix2world(xs, ys, 0), unit="deg")
        sep = a.separation(b).arcsec.max()
        assert sep < WCS_TOLERANCE_ARCSEC, f"{planned.calib_path}: WCS off the truth by {sep:.2f}\""

    # The pipeline groups frames into visits by v1's rule (same object and filter, gap < 300 s): the
    # simulator's sequences of one target and filter follow each other closely and form one visit.
    visits = {(f.object, f.filter, f.visit) for f in plans[0].frames}
    assert len({(f["object"], f["filter"]) for f in science}) == len({(o, f) for o, f, _ in visits})
    stacks = [e for e in evs if e.kind == "stack.done"]
    assert len({e.path for e in stacks}) == len(stacks) == len(visits), \
        f"{len(stacks)} stack.done for {len(visits)} visits"
    for s in stacks:
        members = sorted(f.calib_path for f in plans[0].frames if f.visit == s.visit)
        assert sorted(s.input_paths) == members, f"{s.path}: inputs differ from the visit's frames"
    diffs = [e for e in evs if e.kind == "diff.done"]
    assert sorted(e.science_path for e in diffs) == sorted(e.path for e in stacks), \
        "every stack subtracted exactly once"
    for s in stacks:
        owned_and_stamped(s.path)
    for d in diffs:
        assert d.ok, f"{d.science_path}: {d.reason}"
        owned_and_stamped(d.path)
    phot_diff = [e for e in evs if e.kind == "phot.done" and e.image_kind == "difference"]
    assert sorted(e.image_path for e in phot_diff) == sorted(d.path for d in diffs)


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("service", ["nats", *STAGES])
def test_service_becomes_healthy(pipeline, service):
    pipeline.wait_healthy([service], timeout=240)
    if service != "nats":
        wait_for(lambda: pipeline.exec(service, "gppy-healthcheck", "http://127.0.0.1:8080/readyz",
                                       check=False).returncode == 0, 120, f"{service} /readyz")


def test_images_are_labelled_and_run_locked_down(pipeline):
    env = pipeline.built_with  # the version and revision the images were built from
    pipeline.wait_healthy(["nats"], timeout=120)
    base_layers = set(pipeline.inspect(f"gppy-base:{TAG}")["RootFS"]["Layers"])
    for service in STAGES:
        img = pipeline.inspect(f"gppy-{service}:{TAG}")
        labels = img["Config"]["Labels"]
        assert labels["org.opencontainers.image.version"] == env["GPPY_VERSION"]
        assert labels["org.opencontainers.image.revision"] == env["GPPY_REVISION"]
        assert labels["org.gppy.stage"] == service
        layers = img["RootFS"]["Layers"]
        assert base_layers <= set(layers), f"{service} is not built on the shared base"
        own = len(layers) - len(base_layers)
        assert own <= 3, f"{service} adds {own} layers"
    # One stage container as it runs: the pipeline user, read-only root, writable /tmp, the data
    # root at the host's absolute path, the secret readable, no secret in the environment.
    pipeline.wait_healthy(["calib"], timeout=240)
    out = pipeline.exec("calib", "sh", "-c",
                        'id -u; id -g; touch /opt/gppy/x 2>/dev/null && echo rw || echo ro; '
                        'touch /tmp/x && echo tmp-ok; test -r /run/secrets/nats_password && echo secret-ok; '
                        'env | grep -c NATS_PASSWORD= || true; echo "$GPPY_CONFIG"; '
                        'test -f "$GPPY_CONFIG" && echo config-ok').stdout.split()
    assert out[:5] == [str(UID), str(GID), "ro", "tmp-ok", "secret-ok"], out
    assert out[5] == "0", "a password in the environment"
    assert out[6] == str(pipeline.data_root / "path.json") and out[7] == "config-ok"
    # No secret in any image layer's history or configuration.
    secret = pipeline.password
    for service in ["base", *STAGES]:
        hist = json.dumps(pipeline.inspect(f"gppy-{service}:{TAG}"))
        assert secret not in hist


def test_night_ready_from_the_host_reaches_calib(pipeline):
    """An operator's ad hoc night-ready (published from the host to the NATS port) is taken
    by calib's consumer and acknowledged (here for an empty night folder: refused cleanly)."""
    pipeline.wait_healthy(["calib"], timeout=240)
    wait_for(lambda: pipeline.exec("calib", "gppy-healthcheck", "http://127.0.0.1:8080/readyz",
                                   check=False).returncode == 0, 120, "calib /readyz")
    empty = pipeline.data_root / "obsdata" / "7DT99" / "2025-01-01_gain2750"
    empty.mkdir(parents=True)
    chown_tree(pipeline.data_root / "obsdata" / "7DT99")
    ev = NightReady(night_id=naming.night_id("7DT99", empty), unit="7DT99", night_dir=str(empty), attempt=1)
    before = consumer(pipeline, "calib-survey").delivered.stream_seq

    async def go(js, settings):
        await bus.publish(js, ev, settings.subject_prefix)

    pipeline.nats(go)

    def taken():
        info = consumer(pipeline, "calib-survey")
        return info.delivered.stream_seq > before and info.num_ack_pending == 0 and info.num_pending == 0

    wait_for(taken, NIGHT_TIMEOUT_S, "calib to take and acknowledge the night-ready", interval=2.0)
    outcome = events(pipeline, ev.night_id)
    assert any(e.kind in ("stage.failed", "night.plan") and getattr(e, "stage", "calib") == "calib"
               for e in outcome), [e.kind for e in outcome]


@pytest.mark.timeout(3600)
def test_night_then_scale_swap_and_restart(pipeline):
    stack = pipeline
    stack.wait_healthy(["nats", *STAGES], timeout=300)
    root = stack.data_root
    night1 = naming.night_id(UNIT, root / "obsdata" / UNIT / f"{NIGHT1}_gain2750")

    # ---- night 1: found by the watcher, run to the end, products against the truth
    done1 = wait_night_done(stack, night1)
    assert done1.status == "done"
    check_products(stack, night1, root.parent / "sim1")

    # ---- night 2 with subtraction held, then two replicas replaced mid-night by a new image
    stack.compose("stop", "subtract")
    night2 = naming.night_id(UNIT, drop_night2(root, root.parent / "sim2"))
    n_visits2 = len({(f["object"], f["filter"]) for f in truth(root.parent / "sim2")["frames"]
                     if f.get("kind") == "science"})

    def upstream_idle_and_subtraction_waiting() -> bool:
        if len(events(stack, night2, "stack.done")) < n_visits2:
            return False
        for stage in ("calib", "astrometry", "phot", "stack"):
            for lane in bus.LANES:
                info = consumer(stack, f"{stage}-{lane}")
                if info.num_pending or info.num_ack_pending:
                    return False
        return consumer(stack, "subtract-survey").num_pending >= 1

    wait_for(upstream_idle_and_subtraction_waiting, NIGHT_TIMEOUT_S,
             f"the {n_visits2} stacks of {night2} waiting for subtraction", interval=3.0)
    assert not events(stack, night2, "night.done"), "the night ended without subtraction"

    swap_env = dict(image_env(), GPPY_SUBTRACT_TAG=SWAP_TAG,
                    GPPY_REVISION=image_env()["GPPY_REVISION"] + "-swap")
    stack.compose("build", "subtract", env=swap_env, timeout=900)
    stack.up("subtract", scale={"subtract": 2}, no_deps=True)
    wait_for(lambda: consumer(stack, "subtract-survey").num_ack_pending >= 1, 180,
             "a subtract replica holding a message", interval=0.3)
    old = set(stack.container_ids("subtract"))
    # Follow the old containers' logs to the end: how many messages each held at SIGTERM.
    followers = [subprocess.Popen(["docker", "logs", "-f", cid], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for cid in old]
    held_at_swap = consumer(stack, "subtract-survey").num_ack_pending
    stack.up("subtract", scale={"subtract": 2}, no_deps=True, env=swap_env)
    in_flight = []
    for f in followers:
        out, _ = f.communicate(timeout=120)
        stops = re.findall(r"stopping: no new messages; (\d+) in flight", out)
        assert stops, f"an old subtract container did not stop gracefully:\n{out[-2000:]}"
        in_flight.append(int(stops[-1]))  # (a container restarted by `up` also logged its earlier stop)
    print(f"subtract swap: {held_at_swap} message(s) held just before; the old containers had {in_flight} "
          "in flight at SIGTERM")
    stack.env_extra.update(GPPY_SUBTRACT_TAG=SWAP_TAG)
    new = set(stack.container_ids("subtract"))
    assert len(new) == 2 and not (new & old), "the subtract containers were not replaced"
    for cid in new:
        labels = stack.inspect(stack.inspect(cid)["Image"])["Config"]["Labels"]
        assert labels["org.opencontainers.image.revision"].endswith("-swap")
    done2 = wait_night_done(stack, night2)
    assert done2.status == "done"
    check_products(stack, night2, root.parent / "sim2")
    info = consumer(stack, "subtract-survey")
    subjects = list(info.config.filter_subjects or [info.config.filter_subject])
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert info.num_redelivered == 0, "a subtraction message was delivered twice"
    assert info.delivered.consumer_seq == messages_on(stack, subjects), "deliveries != messages"

    # ---- down + up: stream, consumers and the ledger survive; no night is queued again
    async def state(js, settings):
        st = (await js.stream_info(settings.stream)).state
        kv = await js.key_value(f"{settings.stream}_nights")
        keys = sorted(await kv.keys())
        return st.messages, st.last_seq, keys

    before = stack.nats(state)
    assert f"n.{night1}" in before[2] and f"n.{night2}" in before[2]
    stack.down()
    assert stack.ps(all_=True) == []
    stack.up()
    stack.wait_healthy(["nats", *STAGES], timeout=300)
    wait_for(lambda: stack.exec("watcher", "gppy-healthcheck", "http://127.0.0.1:8080/readyz",
                                check=False).returncode == 0, 120, "watcher /readyz")
    after = stack.nats(state)
    assert after[:2] == before[:2] and set(before[2]) <= set(after[2])
    nights = httpx.get(f"http://127.0.0.1:{stack.api_port}/nights", timeout=10).json()
    states = {n["night_id"]: n["state"] for n in nights}
    assert states.get(night1) == "done" and states.get(night2) == "done", states
    # Several scan periods later nothing was queued again.
    time.sleep(10)
    assert stack.nats(state)[1] == before[1], "the restarted stack published again"
