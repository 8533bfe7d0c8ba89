"""Several replicas behind one client: gRPC's own name resolution and `round_robin` policy, no
balancer of ours. A client takes one endpoint, several (a list, or "a:1,b:2"), or a `dns:///name:port`
target; each new call goes to the next replica whose connection is up, so a request that has not
started yet moves off a replica that went away, and the client's retry (before the first token) lands
on a healthy one. On Kubernetes, point `dns:///` at a headless Service: it resolves to every ready pod.

    Client(["10.0.0.5:8001", "10.0.0.6:8001"])
    Client("dns:///hermes-triton-grpc.default.svc.cluster.local:8001")
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

# gRPC's service config (https://github.com/grpc/grpc/blob/master/doc/service_config.md).
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def endpoints(url: str | Sequence[str]) -> list[str]:
    """The endpoints in `url`: a list, or one string with commas."""
    items = [url] if isinstance(url, str) else list(url)
    found = [e.strip() for item in items for e in item.split(",") if e.strip()]
    if not found:
        raise ValueError("no server endpoint given (host:port, a list of them, or dns:///name:port)")
    return found


def grpc_target(url: str | Sequence[str]) -> str:
    """The gRPC target for `url`. One endpoint is passed as it is; several must be IP addresses with
    ports (gRPC's ipv4:/ipv6: resolvers take a list); host names go through one `dns:///` target."""
    eps = endpoints(url)
    if len(eps) == 1:
        return eps[0]
    if any(e.startswith(_SCHEMES) for e in eps):
        raise ValueError(f"a target with a scheme ({eps[0]}) stands alone: give one dns:/// target or a list of "
                         "ip:port endpoints")
    hosts = [_ip(e) for e in eps]
    if all(h.version == 4 for h in hosts):
        return "ipv4:" + ",".join(eps)
    if all(h.version == 6 for h in hosts):
        return "ipv6:" + ",".join(eps)
    raise ValueError("several endpoints must all be IPv4 or all IPv6 addresses")


def _ip(endpoint: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host, sep, port = endpoint.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        if not sep or not port.isdigit():
            raise ValueError
        return ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r}: several endpoints must be ip:port; for host names use one "
                         f"dns:///name:port target (a headless Service on Kubernetes)") from None


def channel_args() -> list[tuple[str, object]]:
    """tritonclient's default channel arguments (they are replaced, not merged, when given) plus the
    round_robin policy."""
    from tritonclient.grpc import KeepAliveOptions
    from tritonclient.grpc._client import MAX_GRPC_MESSAGE_SIZE

    k = KeepAliveOptions()
    return [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", k.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", k.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", k.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", k.http2_max_pings_without_data),
            ("grpc.service_config", ROUND_ROBIN)]
