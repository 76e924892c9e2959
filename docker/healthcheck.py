"""Container HEALTHCHECK: exit 0 when GET /health on the local server answers 200.

Standard library only (no curl in the image). Reads the same HF_SERVE_* variables as the server.
"""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("HF_SERVE_PORT", "8000")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health")
    api_key = os.environ.get("HF_SERVE_API_KEY")
    if api_key:  # harmless if /health is public, needed if it is not
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # any failure (refused, timeout, HTTP error) means unhealthy
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
