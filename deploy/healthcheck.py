#!/opt/gppy/venv/bin/python
"""Container health check: GET a URL, exit 0 on HTTP 2xx, 1 otherwise.

``gppy-healthcheck`` probes ``http://127.0.0.1:$GPPY_HTTP_PORT/healthz``;
``gppy-healthcheck URL`` probes URL (the NATS server's monitoring ``/healthz``).
Only the standard library: it runs every few seconds and must start fast.
"""

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('GPPY_HTTP_PORT', '8080')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # noqa: S310 - a local http URL
            ok = 200 <= resp.status < 300
            body = resp.read(300).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(("healthy: " if ok else "unhealthy: ") + body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
