"""`kinema serve`: ComfyUI's HTTP + websocket API and Kinema's web page, over a persisted queue.

Binds 127.0.0.1 unless told otherwise; any other address needs --token (or an explicit --insecure).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

from kinema.errors import KinemaError

log = logging.getLogger("kinema")


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve ComfyUI's API (and the web page) over a job queue", description=__doc__)
    s.add_argument("--debug", action="store_true", help="show tracebacks")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback needs --token)")
    s.add_argument("--port", type=int, default=8188, help="port (ComfyUI's)")
    s.add_argument("--models", default=None, metavar="DIR",
                   help="ComfyUI-style models folder (diffusion_models/, text_encoders/, vae/, clip_vision/, loras/)")
    s.add_argument("--extra_model_paths", default=None, metavar="YAML", help="more model folders, as ComfyUI's "
                   "extra_model_paths.yaml")
    s.add_argument("--output", default="output", metavar="DIR", help="where jobs write (and where the queue lives: "
                   "DIR/.kinema/queue.sqlite)")
    s.add_argument("--input", default="input", metavar="DIR", help="uploads and LoadImage's folder")
    s.add_argument("--token", default=os.environ.get("KINEMA_TOKEN"), metavar="T",
                   help="require this token on every request (Authorization: Bearer T, basic auth with password T, "
                        "or ?token=T); default: $KINEMA_TOKEN")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token (anyone who "
                   "reaches the port can run jobs and read every output)")
    s.add_argument("--max_upload_mb", type=float, default=100, metavar="N", help="largest upload")
    s.add_argument("--max_body_mb", type=float, default=16, metavar="N", help="largest other request body")
    s.add_argument("--memory_budget", type=float, default=None, metavar="GB",
                   help="loaded models kept between prompts up to this size (default: all of them)")
    s.add_argument("--comfy-frontend", dest="comfy_frontend", action="store_true",
                   help="serve ComfyUI's own graph editor (the comfyui-frontend-package wheel) at / instead of Kinema's page")
    r = s.add_argument_group("Ray (README, \"Many machines\"): jobs on a cluster's workers, pip install 'kinema[ray]'")
    r.add_argument("--ray", default=None, metavar="auto|local|HOST:PORT",
                   help="run each job on a Ray worker that keeps its models loaded: auto joins the cluster of "
                        "`ray start --head` (or $RAY_ADDRESS), local starts Ray inside the server, HOST:PORT or "
                        "ray://HOST:10001 joins that head; the queue stays in this server's SQLite file")
    r.add_argument("--ray_workers", type=int, default=None, metavar="N",
                   help="workers (each one job at a time; default: the cluster's GPUs / GPUs per job, 1 without GPUs)")
    r.add_argument("--ray_cpus", type=float, default=1.0, metavar="N", help="CPUs per rank of a worker")
    r.add_argument("--ray_gpus", type=float, default=None, metavar="N",
                   help="GPUs per rank of a worker (default 1 on a cluster with GPUs, else 0)")
    r.add_argument("--ray_setup", action="append", default=[], metavar="FILE.py",
                   help="a Python file every worker runs at start (e.g. one that registers custom nodes); repeatable")
    for flag, kind, helptext in (
            ("--ulysses_size", int, "each job's tokens over U ranks (Ulysses); a worker is U x R x C GPUs of one machine"),
            ("--ring_size", int, "each job's tokens over R ranks (ring attention)"),
            ("--cfg_parallel", bool, "cond and uncond on two rank groups"),
            ("--t5_fsdp", bool, "umT5 sharded over a worker's ranks"), ("--dit_fsdp", bool, "the DiT sharded over them"),
            ("--vae_parallel", bool, "the VAE decode split by tiles over them")):
        if kind is bool:
            r.add_argument(flag, action="store_true", help=f"with --ray: {helptext} (Kinema's pipeline nodes)")
        else:
            r.add_argument(flag, type=int, default=1, metavar="N", help=f"with --ray: {helptext}")
    s.set_defaults(run=cmd_serve)


def check_bind(host: str, token: str | None, insecure: bool) -> None:
    from kinema.server.security import is_loopback

    if is_loopback(host) or token:
        return
    if not insecure:
        raise KinemaError(f"refusing to listen on {host} without a token: anyone who can reach it could run jobs and "
                          "read every output. Pass --token SECRET (clients then send 'Authorization: Bearer SECRET'), "
                          "or --insecure to serve it open anyway, or --host 127.0.0.1.")
    bar = "!" * 78
    log.warning("%s\n  kinema serve is listening on %s WITHOUT A TOKEN (--insecure): anyone who can reach this port "
                "can queue jobs and read every output.\n%s", bar, host, bar)


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise KinemaError(f"--port {port} is not a port number (1-65535).")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise KinemaError(f"port {port} on {host} is in use (another server?); pass --port N.") from None
            raise KinemaError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host.") from None


def _lock_output(output: Path):
    """One server per output folder: two would run the same queue."""
    import fcntl

    state = output / ".kinema"
    state.mkdir(parents=True, exist_ok=True)
    f = open(state / "server.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        raise KinemaError(f"another kinema serve (pid {f.read().strip() or '?'}) uses the output folder {output}; "
                          "stop it or pass another --output.") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def comfy_frontend_root() -> Path:
    try:
        import comfyui_frontend_package
    except ImportError:
        raise KinemaError("--comfy-frontend needs ComfyUI's frontend: pip install comfyui-frontend-package") from None
    root = Path(comfyui_frontend_package.__file__).parent / "static"
    if not (root / "index.html").is_file():
        raise KinemaError(f"comfyui-frontend-package has no static/index.html under {root.parent}; reinstall it.")
    return root


def cluster_options(args):
    """--ray and its flags as checked ClusterOptions, or None; the parallel flags need --ray."""
    from kinema.parallel.mesh import ParallelOptions

    parallel = ParallelOptions(args.ulysses_size, args.ring_size, args.cfg_parallel, args.t5_fsdp, args.dit_fsdp,
                               args.vae_parallel)
    if args.ray is None:
        if parallel.active or args.ray_workers is not None or args.ray_gpus is not None or args.ray_setup:
            raise KinemaError("--ulysses_size / --ring_size / --cfg_parallel / --t5_fsdp / --dit_fsdp / --vae_parallel "
                              "and the --ray_* flags shape the Ray workers; add --ray auto (README, \"Many machines\").")
        return None
    from kinema.server.cluster import ClusterOptions, import_ray

    options = ClusterOptions(args.ray, args.ray_workers, args.ray_cpus, args.ray_gpus, parallel,
                             tuple(args.ray_setup)).check()
    import_ray()  # not installed: the error says how to install it
    return options


def cmd_serve(args) -> None:
    import uvicorn

    from kinema.server.app import ServerConfig, create_app

    check_bind(args.host, args.token, args.insecure)
    _check_port(args.host, args.port)
    for flag, value in (("--max_upload_mb", args.max_upload_mb), ("--max_body_mb", args.max_body_mb)):
        if not value > 0:
            raise KinemaError(f"{flag} {value} must be above 0.")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise KinemaError(f"--memory_budget {args.memory_budget} must be above 0 (GB).")
    output = Path(args.output).expanduser()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KinemaError(f"cannot create the output folder {output}: {e.strerror or e}.") from None
    cluster = cluster_options(args)
    lock = _lock_output(output)  # noqa: F841  (held until the process ends)
    if cluster is not None:
        from kinema.server.cluster import connect

        cluster = connect(cluster)  # an address nothing answers at is an error here, before the server starts
    config = ServerConfig(output_dir=output, input_dir=Path(args.input).expanduser(), models_dir=args.models,
                          extra_model_paths=args.extra_model_paths, token=args.token, max_body_mb=args.max_body_mb,
                          max_upload_mb=args.max_upload_mb, memory_budget_gb=args.memory_budget,
                          web_root=comfy_frontend_root() if args.comfy_frontend else None,
                          comfy_frontend=args.comfy_frontend, cluster=cluster)
    app = create_app(config)
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    log.info("kinema serve: http://%s:%d/ (output %s)", shown, args.port, output)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws="websockets-sansio")
