"""`hf-serve` / `python -m service`: parse flags (and HF_SERVE_* env vars), then run uvicorn."""

from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from .app import create_app
    from .settings import Settings

    settings = Settings(
        _cli_parse_args=sys.argv[1:] if argv is None else argv,
        _cli_prog_name="hf-serve",
        _cli_kebab_case=True,
    )
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn's access log carries method, path and status only: request bodies are never logged.
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal, which would make a
    # clean shutdown look like a crash (exit -15) to supervisors: exit 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
