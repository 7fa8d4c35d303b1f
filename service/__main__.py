"""python -m service --model DIR [--host HOST] [--port PORT]

Starts the text-generation service: validates the settings (environment variables, see
docs/api.md), the model bundle and the port, then runs LitServe's processes until SIGTERM or
SIGINT (drain, exit 0) or until a child process dies (exit 1).

Exit status: 0 after a drain; 1 when a process of the service died or the engine could not be
loaded; 2 for a configuration error (bad setting, bad bundle, port in use).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from service.settings import LOG_FORMAT, Settings, SettingsError

logger = logging.getLogger("service")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a model bundle behind an OpenAI-compatible HTTP API. Every setting is "
        "also an environment variable (TEXTGEN_*); flags override them. See docs/api.md.",
        epilog=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", metavar="DIR", help="model bundle folder (TEXTGEN_MODEL_DIR)")
    ap.add_argument("--host", help="bind address: 127.0.0.1, 0.0.0.0 or :: (TEXTGEN_HOST)")
    ap.add_argument("--port", type=int, help="HTTP port (TEXTGEN_HTTP_PORT)")
    return ap.parse_args(argv)


def _settings_help() -> str:
    lines = ["environment variables (default):"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "unset"
        lines.append(f"  {Settings.env_name(name):<28} {field.description or ''} ({default})")
    return "\n".join(lines)


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise SettingsError(
                f"cannot listen on {host}:{port}: {e.strerror} (is another server using the port? "
                "choose one with TEXTGEN_HTTP_PORT or --port)"
            ) from None


def build_server(settings: Settings, bundle, tokenizer):
    """Wire LitServe's server: the engine worker API, the HTTP API, the shared state."""
    from service.http.api import HttpApi, model_info
    from service.process.frontend import Frontend
    from service.process.lifecycle import TextGenServer
    from service.process.shared_state import SharedState
    from service.process.worker import TextGenAPI

    state = SharedState(settings.http_workers, main_pid=os.getpid())
    model = model_info(settings, bundle, tokenizer)
    server = TextGenServer(TextGenAPI(settings, state, model.name), settings, state)
    HttpApi(settings, state, model, Frontend(server, settings, state, model)).install(server.app)
    return server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(model_dir=args.model, host=args.host, http_port=args.port)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)

    from bundle.format import BundleError, load_bundle
    from bundle.tokenizer import Tokenizer
    from service.http.jinja_template import load_chat_template

    try:
        bundle = load_bundle(settings.model_dir)
        tokenizer = Tokenizer.from_bundle(bundle)
        load_chat_template(bundle, tokenizer)  # a template that does not compile stops the start here
        check_port_free(settings.host, settings.http_port)
    except (BundleError, SettingsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("settings: %s", settings.describe())

    from service import metrics
    from service.process.lifecycle import StartupAborted

    metrics.init_multiprocess(settings.prometheus_multiproc_dir)  # before any process starts
    server = build_server(settings, bundle, tokenizer)
    server.install_signal_handlers()
    try:
        server.run(
            host=settings.host,
            port=settings.http_port,
            num_api_servers=settings.http_workers,
            log_level=settings.log_level,
            generate_client_file=False,
        )
    except StartupAborted:
        logger.info("stopped while the engine was loading")
        _stop_workers(server)
        return 0
    except RuntimeError as e:
        logger.error("%s", e)
        _stop_workers(server)
        return 1
    logger.info("exiting with status %d", server.exit_code)
    return server.exit_code


def _stop_workers(server) -> None:
    from service.process.shared_state import Phase

    server.state.phase = Phase.STOPPING
    for proc in getattr(server, "inference_workers", []):
        proc.terminate()
        proc.join(5)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
