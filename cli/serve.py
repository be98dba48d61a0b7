"""`zoo serve`: the registry as a read-only web app and JSON API (modelzoo.serve)."""

from __future__ import annotations

from typing import Annotated

import typer

from modelzoo.cli.output import console


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; anything but a local one needs --token.")] = (
        "127.0.0.1"),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    token: Annotated[str | None, typer.Option(
        envvar="ZOO_SERVE_TOKEN", help="Secret every request must carry (bearer or /login?token=T cookie).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest search upload accepted, in MB.")] = 10.0,
) -> None:
    """Serve search, version pages and the JSON API (the CLI's --json) over HTTP, read-only."""
    # Imported here, not at the top: main imports this module to register the command, and the web
    # stack is needed only by this one.
    import uvicorn

    from modelzoo.cli.main import State
    from modelzoo.serve import ServeSettings, create_app
    from modelzoo.serve.security import check_bind

    check_bind(host, token)
    settings = ServeSettings(host, port, token or None, int(max_upload_mb * 2**20))
    app = create_app(State.zoo(), settings)
    console.print(f"serving {State.zoo().settings.home} at http://{host}:{port}/ (Ctrl-C stops)")
    # No access log: /login?token=T would write the token into it.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
