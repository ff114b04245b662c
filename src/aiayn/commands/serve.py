"""``aiayn serve``: load the checkpoint, bind the port, serve until Ctrl-C."""

from __future__ import annotations

import sys

from ..errors import UserError


def flag(field: str) -> str:
    """The flag of a `ServeSettings` field: they map one to one (max_beam is --max-beam)."""
    return "--" + field.replace("_", "-")


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"aiayn serve needs FastAPI and uvicorn ({e.name} is missing): "
                        "pip install -c constraints.txt -e '.[serve]'") from None
    from ..serve.app import create_app
    from ..serve.engine import Engine, ServeSettings
    from ..serve.server import bind_socket, is_loopback, url_of
    from ..translator import inference_precision, resolve_device

    # Before loading: a wrong --device, or bf16 where it is emulated, fails fast.
    inference_precision(args.precision, resolve_device(args.device, args.quantize), args.quantize)
    settings = ServeSettings(
        beam=args.beam, alpha=args.alpha, max_len_a=args.max_len_a, max_len_b=args.max_len_b, max_beam=args.max_beam,
        max_lines=args.max_lines, max_chars=args.max_chars, batch_wait_ms=args.batch_wait_ms,
        max_batch_lines=args.max_batch_lines, device=args.device, quantize=args.quantize, precision=args.precision,
        shortlist=args.shortlist, heads=args.heads,
    ).check(name=flag)  # the settings' messages name fields; here, the flags that set them
    if not is_loopback(args.host):
        print(f"aiayn: warning: listening on {args.host}, beyond this machine: the API has no authentication, "
              "so anyone who can reach this address can use the model", file=sys.stderr)
    engine = Engine(args.checkpoint, settings)  # before binding: a bad checkpoint fails fast
    sock = bind_socket(args.host, args.port)
    url = url_of(sock)
    print(f"aiayn: serving {engine.name} on {url}/ (the explorer), API docs at {url}/docs, in "
          f"{engine.translator.precision}; Ctrl-C stops",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(engine), log_level=args.log_level, access_log=args.access_log,
                            lifespan="on", timeout_graceful_shutdown=10)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then raises the signal again for the caller:
        # for a server, Ctrl-C is the normal way to stop, not an interruption.
        pass
    finally:
        sock.close()
        engine.close()
    print("aiayn: server stopped", file=sys.stderr)
    return 0
