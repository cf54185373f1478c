"""The `vigil` command.

Every option can also come from an environment variable: `--metrics-port` is read
from VIGIL_METRICS_PORT, and so on (the option's name in upper case, dashes as
underscores, with the VIGIL_ prefix). A command-line flag wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from inference.demo import demo_model_path
from inference.loading import INT4_GROUP_SIZES, QUANTIZE_MODES
from inference.server import InferenceServer, ServerOptions
from inference.serving import Limits
from inference.versions import EngineOptions


def option(group, name: str, **kwargs) -> None:
    """Add --name to `group`, defaulting to $VIGIL_NAME when it is set; a value in the
    environment that the option would refuse stops the command with the variable's name."""
    var = "VIGIL_" + name[2:].upper().replace("-", "_")
    kwargs["help"] = kwargs.get("help", "") + f" [env {var}] (default: %(default)s)"
    if var in os.environ:
        value = os.environ[var]
        convert = kwargs.get("type", str)
        try:
            converted = convert(value)
        except (TypeError, ValueError):
            raise SystemExit(f"vigil: {var}={value!r} is not a valid value for {name}") from None
        choices = kwargs.get("choices")
        if choices is not None and converted not in choices:
            raise SystemExit(f"vigil: {var}={value!r} is not one of {', '.join(map(str, choices))}")
        kwargs["default"] = value
    group.add_argument(name, **kwargs)


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def add_server_options(p: argparse.ArgumentParser) -> None:
    d = ServerOptions()
    g = p.add_argument_group("network")
    option(g, "--host", default=d.host, help="address to listen on, gRPC and metrics")
    option(g, "--port", type=int, default=d.port, help="gRPC port (Open Inference Protocol and vigil.v1)")
    option(g, "--metrics-port", type=int, default=d.metrics_port,
                   help="Prometheus metrics port; 0 picks a free port, -1 turns metrics off")
    g = p.add_argument_group("model")
    option(g, "--model", default=d.model,
                   help="a GGUF file, a Hugging Face folder (config.json, *.safetensors, tokenizer.json), or 'demo'")
    option(g, "--model-name", default=d.model_name,
                   help="name the model is served under; default: smollm2-135m-instruct for the demo, "
                        "else the file or folder name")
    option(g, "--model-version", default=d.version, help="version label of the model loaded at start")
    option(g, "--quantize", choices=QUANTIZE_MODES, default=d.quantize,
                   help="weight-only precision: none (fp32), int8 per channel, int4 group-wise "
                        "(Q4_0/Q4_1 GGUF weights are taken over exactly)")
    option(g, "--group-size", type=int, choices=INT4_GROUP_SIZES, default=d.group_size,
                   help="int4 group size")
    g = p.add_argument_group("scheduling")
    e = EngineOptions()
    option(g, "--kv-slots", type=positive, default=e.kv_slots,
                   help="KV cache slots per model version: the most sequences decoded together")
    option(g, "--max-seq-len", type=positive, default=e.max_seq_len,
                   help="tokens per KV slot: prompt plus completion")
    option(g, "--max-waiting", type=positive, default=e.max_waiting,
                   help="requests that may wait for a slot; beyond it calls get RESOURCE_EXHAUSTED")
    lim = Limits()
    option(g, "--max-tokens-limit", type=positive, default=lim.max_tokens,
                   help="largest max_tokens a request may ask for")
    option(g, "--default-max-tokens", type=positive, default=lim.default_max_tokens,
                   help="max_tokens of a request that does not set it")
    option(g, "--max-prompt-chars", type=positive, default=lim.max_prompt_chars,
                   help="longest prompt accepted, in characters")
    option(g, "--threads", type=int, default=d.threads, help="torch CPU threads; 0 keeps torch's default")


def server_options(args) -> ServerOptions:
    return ServerOptions(
        host=args.host, port=args.port, metrics_port=args.metrics_port, model=args.model,
        model_name=args.model_name, version=args.model_version, quantize=args.quantize,
        group_size=args.group_size, threads=args.threads,
        engine=EngineOptions(kv_slots=args.kv_slots, max_seq_len=args.max_seq_len, max_waiting=args.max_waiting),
        limits=Limits(max_tokens=args.max_tokens_limit, default_max_tokens=min(args.default_max_tokens,
                                                                                args.max_tokens_limit),
                      max_prompt_chars=args.max_prompt_chars))


async def run_server(options: ServerOptions, banner: str) -> None:
    server = InferenceServer(options)
    await server.start()
    o = server.options
    print(f"{banner}: gRPC on {o.host}:{server.port} "
          f"(Open Inference Protocol + vigil.v1), metrics on http://{o.host}:{server.metrics_port}/metrics",
          flush=True)
    for mv in server.router.all():
        print(f"  model {mv.model} version {mv.version} ({mv.quantize}) from {mv.source}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down", flush=True)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vigil", description="Serve an LLM over gRPC and watch it in production.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the inference server",
                           description="Run the gRPC inference server with one model version loaded.")
    add_server_options(serve)
    up = sub.add_parser("up", help="run the whole loop on this machine",
                        description="Run Vigil on this machine: for now, the inference server with the demo model.")
    add_server_options(up)
    sub.add_parser("fetch-demo", help="download the demo model into the cache folder",
                   description="Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into $VIGIL_CACHE_DIR or ~/.cache/vigil.")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "fetch-demo":
        print(demo_model_path())
        return 0
    try:
        asyncio.run(run_server(server_options(args), "vigil up" if args.command == "up" else "vigil serve"))
    except (OSError, ValueError) as exc:
        print(f"vigil {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
