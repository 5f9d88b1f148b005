"""Container health probe: exit 0 when batchmax's ``/health`` answers 200, else 1.

The images' ``HEALTHCHECK`` runs it with the image's Python (no curl or wget needed).
``/health`` answers 503 while the model loads, after a load failure and while draining.

Environment: ``BATCHMAX_HEALTH_URL`` (default ``http://127.0.0.1:$BATCHMAX_PORT/health``),
``BATCHMAX_PORT`` (default 8000; set it when you pass ``--port``).
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("BATCHMAX_PORT", "8000")
    url = os.environ.get("BATCHMAX_HEALTH_URL") or f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            status = resp.status
            body = resp.read(200).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 503: loading, failed or draining
        status, body = exc.code, exc.read(200).decode("utf-8", "replace")
    except OSError as exc:  # not listening yet, refused, timed out
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(f"{'healthy' if status == 200 else 'unhealthy'}: {url}: {status} {body}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
