"""Serve a Qwen3 checkpoint: a web page at / and an OpenAI-compatible API under /v1.

    python serve.py                      # best checkpoint of the most recent run under checkpoints/
    python serve.py --ckpt DIR           # a step dir, a run dir (its best), or a Hugging Face Qwen3 dir
    python serve.py --port 8080 --host 0.0.0.0 --api-key KEY   # other interfaces: with a key

Endpoints: GET /, GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`stream: true` for server-sent events); the schema at /openapi.json, its pages at /docs.
`max_tokens` above --max-tokens-cap is refused (400); generation also ends where the model's
context is full (finish_reason "length"); a prompt that fills the whole context is refused (400).
With --api-key (or QWEN3_API_KEY), /v1/* wants `Authorization: Bearer KEY` (401 without it);
/health and the page stay open (the page asks for the key). Bodies above --max-body-bytes get
413; requests beyond --max-queue waiting get 429 with Retry-After.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from trainer.errors import CheckpointError
from trainer.run_layout import find_model_dir

DEFAULT_MAX_TOKENS_CAP = (
    1024  # the largest max_tokens a request may ask for, unless --max-tokens-cap says otherwise
)
# 8 MiB: room for --max-batch-size 32 prompts of 32k token ids each as JSON (~7 MB), while a
# client cannot make the server buffer and parse an unbounded body.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 256  # requests waiting for rows; beyond it 429, so a flood cannot pile up
API_KEY_ENV = "QWEN3_API_KEY"


class PortError(Exception):
    """The address cannot be listened on; the message says what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ckpt", help="checkpoint or Hugging Face Qwen3 directory (default: newest run's best)"
    )
    parser.add_argument(
        "--checkpoints", default="checkpoints", help="where runs live (default: %(default)s)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default: %(default)s, loopback only)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on a CUDA GPU that has it, else as saved",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: int8 weights, decoded by torch's int8 CPU kernels (CPU, float32 only)",
    )
    parser.add_argument(
        "--model-name", help="model id in the API (default: <run>/<step> or the dir name)"
    )
    parser.add_argument(
        "--max-tokens-cap",
        type=int,
        default=DEFAULT_MAX_TOKENS_CAP,
        help="largest max_tokens a request may ask for; more is refused (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="sequences decoded at once; more requests wait their turn (default: %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"/v1/* wants 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies are refused with 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="requests that may wait for a free row; more get 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for generation (default on CPU: all cores but one; elsewhere torch's)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    for name in ("max_tokens_cap", "max_batch_size", "threads", "max_body_bytes", "max_queue"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key must not be empty; pass a secret, or leave it out for no key")
    if args.api_key is not None and not (args.api_key.isascii() and args.api_key.isprintable()):
        parser.error(
            "--api-key must be printable ASCII (it travels in an HTTP header, which clients "
            "send as ASCII); pick another key"
        )
    if args.quantize and args.device not in ("auto", "cpu"):
        parser.error(
            f"--quantize {args.quantize} runs on the CPU only (torch's int8 kernels are CPU "
            f"kernels), not on {args.device}; pass --device cpu or drop --quantize"
        )
    if args.quantize and args.dtype not in (None, "float32"):
        parser.error(
            f"--quantize {args.quantize} starts from float32 weights, not {args.dtype}; drop "
            "--dtype or --quantize"
        )
    return args


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a taken port is reported before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == 98 or "in use" in str(err).lower():
            raise PortError(
                f"port {port} on {host} is already in use; stop the other server or pass --port N"
            ) from err
        raise PortError(
            f"cannot listen on {host}:{port} ({err.strerror}); check --host and --port"
        ) from err
    sock.listen(2048)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = find_model_dir(args.ckpt, args.checkpoints, "--ckpt ")
        sock = bind_socket(args.host, args.port)
        # Imported late so that the checks above answer before torch and FastAPI load.
        from serving.served_model import load_served_model, quantize_device_note

        served = load_served_model(
            path, device=args.device, dtype=args.dtype, name=args.model_name, quantize=args.quantize
        )
    except (CheckpointError, PortError) as err:
        print(f"serve.py: error: {err}", file=sys.stderr)
        return 1
    import uvicorn

    from qwen3 import pick_device
    from serving.app import create_app

    app = create_app(
        served,
        max_tokens_cap=args.max_tokens_cap,
        max_batch_size=args.max_batch_size,
        threads=args.threads,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_queue=args.max_queue,
    )
    note = quantize_device_note(args.quantize, args.device, pick_device("auto"))
    if note:
        print(note, flush=True)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"Serving {served.name} ({served.num_params:,} parameters, context {served.context_length}, "
        f"{served.device}) from {path}\nOpen http://{shown}:{port}/ - API at http://{shown}:{port}/v1",
        flush=True,
    )
    if args.api_key:
        print("API key required on /v1/* (Authorization: Bearer KEY)", flush=True)
    elif not is_loopback(host):
        print(
            f"warning: listening on {host} without an API key: anyone who can reach this "
            f"machine can use the model; pass --api-key KEY (or set {API_KEY_ENV})",
            flush=True,
        )
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
