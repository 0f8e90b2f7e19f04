"""A Ray address checked before ray.init joins it: ray.init waits for minutes, printing Ray's warnings, where
nothing answers or something else does; this says so in one line within seconds."""

from __future__ import annotations

import os
import socket
import time

from runner.errors import ClusterError, first_line

GCS_PROBE_S = 5.0  # an --address is tried about once a second for this long (its head may be restarting)
GRPC_PROBE_S = 3.0  # and what answers there has this long to answer as a gRPC server


def check_address(address: str) -> None:
    """ClusterError (one line) unless a Ray cluster answers at `address`: a GCS address (HOST:PORT), a Ray
    Client one (ray://HOST:PORT), or "auto" as Ray resolves it. ray.init would wait for minutes, printing Ray's
    warnings, where nothing answers or where something else does."""
    target = _resolve_auto() if address == "auto" else address
    if target is None:  # this Ray cannot resolve "auto" here: left to ray.init
        return
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address}: not HOST:PORT (a head's GCS address, e.g. head:6379; "
                           f"ray://head:10001; or http://head:8265, its dashboard)")
    where = f"--address {address}" + (f" ({target})" if target != address else "")
    try:
        _connect(host.strip("[]"), int(port), GCS_PROBE_S).close()
    except socket.gaierror as e:
        raise ClusterError(f"{where}: cannot resolve {host} ({e.strerror})") from None
    except OSError as e:
        cause = f"no answer within {GCS_PROBE_S:g}s" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
        raise ClusterError(f"{where}: no Ray cluster answers there ({cause})") from None
    client = target.startswith("ray://")
    why_not = _not_grpc(f"{host}:{port}", health=not client)
    if why_not:
        what, port_is = (("Ray Client server", "10001 unless `ray start --ray-client-server-port`") if client
                         else ("GCS", "6379 unless `ray start --port`"))
        raise ClusterError(f"{where}: something answers there, but not a Ray cluster's {what} ({why_not}); "
                           f"the head's {what} port is {port_is} said otherwise")


def _resolve_auto() -> str | None:
    """The GCS address that ray.init("auto") joins (RAY_ADDRESS, else the last `ray start` on this machine),
    by Ray's own lookup (private API: without it, None); ClusterError when there is none."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:
        return None
    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except (ConnectionError, ValueError) as e:  # no cluster found; a RAY_ADDRESS that is not HOST:PORT
        raise ClusterError(f"--address auto: {first_line(e)}") from None


def _connect(host: str, port: int, within_s: float) -> socket.socket:
    """A TCP connection to host:port, tried about once a second for `within_s`; the last try's OSError."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return socket.create_connection((host, port), timeout=min(3.0, max(0.5, deadline - time.monotonic())))
        except socket.gaierror:
            raise
        except OSError:
            if time.monotonic() + 1.0 > deadline:
                raise
            time.sleep(1.0)


def _not_grpc(target: str, health: bool) -> str | None:
    """Why the server at `target` is not the one ray.init needs, or None: it must be a gRPC server, and (with
    `health`) answer gRPC's standard health check, as Ray's GCS does. Not checked over TLS (RAY_USE_TLS), which
    needs Ray's certificates, nor without grpcio (a dependency of Ray's)."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    try:
        import grpc
    except ImportError:
        return None
    silent = f"no gRPC answer within {GRPC_PROBE_S:g}s"
    # As Ray's own channels: never through an HTTP proxy named in the environment.
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            if health:  # b"": the server's overall health
                channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=GRPC_PROBE_S)
            else:
                grpc.channel_ready_future(channel).result(timeout=GRPC_PROBE_S)
            return None
        except grpc.FutureTimeoutError:
            return silent
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return silent
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return "it does not speak gRPC"
            return f"its answer to gRPC's health check: {e.code().name} {first_line(e.details(), 120)}"
