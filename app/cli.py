"""The `loraplex` command (the console script), in both installs. The client commands (datasets, finetune, jobs,
deployments, keys) need the SDK only and run in app/cli_client.py (argparse); the server commands (serve, worker,
engine, tenant, demo, ...) need the server extra and run in app/cli_server.py (typer). Without the extra, a server
command exits with one line saying what to install."""

import sys
from typing import Any

from app import cli_client

SERVER_EXTRA = "pip install 'loraplex[server]'"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in cli_client.COMMANDS:
        raise SystemExit(cli_client.main(args))
    try:
        from app.cli_server import app
    except ModuleNotFoundError as exc:  # the core install: typer, the database, torch... are the server extra's
        if not args or args[0] in ("-h", "--help"):
            print(f"(server commands: serve, worker, engine, tenant, demo, prepare, modal-check: {SERVER_EXTRA})")
            cli_client.main(["--help"])  # prints the client commands and exits
        print(
            f"loraplex {args[0]}: a server command; it needs the server extra ({exc.name} is not installed): "
            f"{SERVER_EXTRA}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    app(args=args, prog_name="loraplex")


def __getattr__(name: str) -> Any:
    """`app.cli.app`: the typer application, as the tests invoke it (the server extra's)."""
    if name == "app":
        from app.cli_server import app

        return app
    raise AttributeError(name)


if __name__ == "__main__":
    main()
