"""`paw-lite serve --programs DIR`: the programs in DIR behind an OpenAI-compatible HTTP API (and
the PAW REST API), batched across requests, until SIGTERM or Ctrl-C (docs/serve.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import PawError
from . import require_positive
from .compile import add_compiler_files


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve programs over HTTP: the OpenAI API and the PAW API (needs the serve extra)")
    p.add_argument("--programs", required=True, type=Path, metavar="DIR",
                   help="folder of .paw programs: each is a model named after its file (alert.paw -> 'alert')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route (default: $PAW_LITE_API_KEY if set)")
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="the server's own files; programs compiled through it go to DIR/compiled "
                        "(default: <user cache>/paw_lite/serve)")
    p.add_argument("--base-model", type=Path, default=None, metavar="PATH",
                   help="the interpreter (GPT-2 or Qwen3) the programs of its family run on; the other family's "
                        "programs, and all by default, run on their <runtime_id>.gguf from --models or the models directory")
    limits = p.add_argument_group("limits (each refusal is a 4xx JSON error)")
    limits.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    limits.add_argument("--max-input-chars", type=int, default=32_000, help="longest input text (default 32000)")
    limits.add_argument("--max-batch", type=int, default=64, help="most prompts in one completions request (default 64)")
    limits.add_argument("--max-concurrent", type=int, default=256,
                        help="most inputs in evaluation at once; more get 429 (default 256)")
    limits.add_argument("--max-tokens-cap", type=int, default=1024,
                        help="largest max_tokens a request may ask for, and the default (default 1024)")
    limits.add_argument("--batch-size", type=int, default=64,
                        help="most inputs of one program evaluated together (default 64)")
    limits.add_argument("--max-loaded", type=int, default=8,
                        help="programs kept loaded at once; one more unloads the least recently used (default 8)")
    compile_ = p.add_argument_group(
        "compiling through the PAW API (as `paw-lite compile`; a compiler per family found)")
    compile_.add_argument("--models", type=Path, metavar="DIR", help="folder with the compiler files and interpreters (default: the models directory)")
    add_compiler_files(compile_)
    compile_.add_argument("--interpreter", type=Path, metavar="GGUF",
                          help="the interpreter compiled programs are for (the files named one by one are for the "
                               "family --compiler-meta names, else Compact; the other family's come from --models)")
    compile_.add_argument("--compile-threads", type=int, default=None, metavar="N",
                          help="threads of llama.cpp's passes in a compile job, nearly all of its time (default: every "
                               "core; fewer leave cores to inference while a compile runs, and it takes longer)")
    p.add_argument("--json", action="store_true", help="print the address and settings as one JSON line once listening")
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from .. import paths
    from ..compiler.config import ModelFiles
    from ..serve.settings import ServeSettings, api_key_from_env

    require_positive(args, "max_body_bytes", "max_input_chars", "max_batch", "max_concurrent", "max_tokens_cap",
                     "batch_size", "max_loaded", "compile_threads")
    if not 0 <= args.port <= 65535:
        raise PawError(f"--port must be 0..65535 (0: any free port), not {args.port}")
    if not args.programs.is_dir():
        raise PawError(f"--programs {args.programs}: not a folder; give the folder that holds the .paw programs")
    data_dir = args.data_dir if args.data_dir is not None else paths.user_cache_root() / "paw_lite" / "serve"
    files = ModelFiles(compiler=args.compiler, mapper=args.mapper, compiler_meta=args.compiler_meta,
                       pseudo_compiler=args.pseudo_compiler, interpreter=args.interpreter)
    return ServeSettings(programs_dir=args.programs.expanduser(), data_dir=data_dir.expanduser(), host=args.host,
                         port=args.port, api_key=api_key_from_env(args.api_key), max_body_bytes=args.max_body_bytes,
                         max_input_chars=args.max_input_chars, max_batch=args.max_batch,
                         max_concurrent=args.max_concurrent, max_tokens_cap=args.max_tokens_cap,
                         batch_size=args.batch_size, max_loaded=args.max_loaded, interpreter=args.base_model, compile_models=files,
                         models_dir=args.models, compile_threads=args.compile_threads)


def run(args: argparse.Namespace) -> int:
    from ..errors import require

    require("starlette", "serve")
    require("uvicorn", "serve")
    from ..serve.app import build_app
    from ..serve.run import serve_forever

    settings = settings_from_args(args)
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"paw-lite: warning: listening on {settings.host} without --api-key: anyone who can reach this "
              f"port can use (and, through the PAW API, compile on) this server", file=sys.stderr)
    app = build_app(settings, extra_routes=_extra_routes(settings))

    def ready(url: str) -> None:
        names = [f.name for f in app.state.store.files()]
        if getattr(args, "json", False):
            print(json.dumps({"url": url, "openai_base_url": url + "/v1", "host": settings.host,
                              "port": int(url.rsplit(":", 1)[1]), "programs_dir": str(settings.programs_dir),
                              "data_dir": str(settings.data_dir), "api_key_required": settings.api_key is not None,
                              "models": names}), flush=True)
        else:
            print(f"paw-lite: serving {len(names)} program(s) from {settings.programs_dir} at {url}/v1 "
                  f"(Ctrl-C or SIGTERM stops)", file=sys.stderr, flush=True)

    serve_forever(settings, app, on_ready=ready, verbose=bool(getattr(args, "verbose", False)))
    return 0


def _extra_routes(settings) -> list:
    """The PAW REST API's routes when that module is present (built on this server's core)."""
    try:
        from ..serve import paw_api  # type: ignore[attr-defined]
    except ImportError:
        return []
    return list(paw_api.routes(settings))
