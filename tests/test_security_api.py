"""Every mutating endpoint of the watcher's HTTP API refuses a request without the token (401)
and with a wrong one (403); the token comes from a secret file. The endpoints are taken from
the running service's routes, so a new mutation without the check fails here.

Real watcher (in this process), real nats-server, requests over HTTP.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from conftest_watcher import UNIT, running_watcher, watcher_settings  # noqa: E402

from gppy.local import free_port  # noqa: E402

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def all_routes(routes, prefix: str = "") -> list[tuple[str, set[str]]]:
    """(path, methods) of every route, into included routers (also hidden ones)."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None) or getattr(r, "router", None)
        if inner is not None and hasattr(inner, "routes"):
            out += all_routes(inner.routes, prefix + (getattr(inner, "prefix", "") or ""))
        elif getattr(r, "methods", None):
            out.append((prefix + r.path, set(r.methods)))
    return out


async def test_every_mutating_endpoint_needs_the_right_token(settings, tmp_path):
    token_file = tmp_path / "api_token"
    token_file.write_text("9f2c61e0b7a84d3c95e1f0a2b4c6d8e0\n")
    token = token_file.read_text().strip()
    s = watcher_settings(settings, http_port=free_port(), http_host="127.0.0.1", api_token=None,
                         api_token_file=token_file)
    async with running_watcher(s) as svc:
        routes = sorted({(m, path) for r in all_routes(svc.app().routes) for path, methods in [r]
                         for m in methods if m in MUTATING})
        assert len(routes) >= 3, routes
        assert ("POST", "/nights/{night_id}/requeue") in routes, routes
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}", timeout=10) as c:
            for method, path in routes:
                url = re.sub(r"\{[^}:]+(:path)?\}", "X_1", path)
                body = {"unit": UNIT, "night_dir": "/x", "frame": "/x"}
                for headers, code in (({}, 401), ({"Authorization": f"Basic {token}"}, 401),
                                      ({"Authorization": "Bearer"}, 401),
                                      ({"Authorization": "Bearer wrong-token"}, 403),
                                      ({"Authorization": f"Bearer {token}x"}, 403),
                                      ({"Authorization": f"Bearer {token[:-1]}"}, 403)):
                    r = await c.request(method, url, json=body, headers=headers)
                    assert r.status_code == code, (method, url, headers, r.status_code, r.text)
                r = await c.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"})
                assert r.status_code not in (401, 403), (method, url, r.status_code, r.text)
            assert (await c.get("/nights")).status_code == 200  # reads stay open
