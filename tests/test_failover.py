"""Client-side load balancing and failover (issue #12): the client names several replicas and gRPC's
own round_robin policy spreads calls over them; when one replica dies, streams running on it end with
UnavailableError and every request not yet started lands on the one still up. Two real tritonservers
on loopback serve the CPU deployment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request

import pytest

from client import AsyncClient, Client, UnavailableError
from client.balancing import ROUND_ROBIN, channel_args, grpc_target
from tests.triton_util import engine_metrics, wait_for

MODEL = "tensorrt_llm_bls"


@pytest.mark.parametrize("url, target", [
    ("127.0.0.1:8001", "127.0.0.1:8001"),
    ("dns:///hermes-triton-grpc:8001", "dns:///hermes-triton-grpc:8001"),
    (["127.0.0.1:8001", "127.0.0.1:8002"], "ipv4:127.0.0.1:8001,127.0.0.1:8002"),
    ("10.0.0.5:8001, 10.0.0.6:8001", "ipv4:10.0.0.5:8001,10.0.0.6:8001"),
    (["[::1]:8001", "[::1]:8002"], "ipv6:[::1]:8001,[::1]:8002"),
])
def test_targets_use_grpcs_own_resolvers(url, target):
    assert grpc_target(url) == target


@pytest.mark.parametrize("url, message", [
    (["triton-0:8001", "triton-1:8001"], "use one dns:///name:port target"),
    (["10.0.0.5:8001", "[::1]:8001"], "must all be IPv4 or all IPv6"),
    (["dns:///a:8001", "10.0.0.5:8001"], "stands alone"),
    ([" , "], "no server endpoint"),
])
def test_bad_endpoint_lists_are_refused_with_the_fix(url, message):
    with pytest.raises(ValueError, match=message):
        grpc_target(url)


def test_round_robin_keeps_tritonclients_channel_defaults():
    import tritonclient.grpc as g

    args = dict(channel_args())
    assert json.loads(args.pop("grpc.service_config")) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert json.loads(ROUND_ROBIN)["loadBalancingConfig"][0] == {"round_robin": {}}
    k = g.KeepAliveOptions()
    assert args["grpc.keepalive_time_ms"] == k.keepalive_time_ms
    assert args["grpc.max_receive_message_length"] == args["grpc.max_send_message_length"] == 2**31 - 1


def test_http_takes_one_endpoint():
    with pytest.raises(ValueError, match="HTTP transport takes one endpoint"):
        Client(["127.0.0.1:8000", "127.0.0.1:8002"], protocol="http")


def _requests_served(server) -> int:
    """Successful requests of the client-facing model, from the server's statistics endpoint."""
    with urllib.request.urlopen(f"{server.http_url}/v2/models/{MODEL}/stats", timeout=5) as r:
        stats = json.load(r)["model_stats"]
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats)


@pytest.fixture
def second_server(smol_server):
    """A second replica of the SmolLM2 deployment (slow enough on this CPU for streams to be running
    when a replica dies; tiny-hermes finishes 400 tokens before the first has been read)."""
    from model_repo.server import TritonServer

    server = TritonServer(smol_server.repo).start()
    yield server
    if server.proc.poll() is None:
        server.stop()


def _active(a, b) -> tuple[int, int] | None:
    """(requests in a's engine, in b's) once they add up to 8."""
    n = tuple(int(engine_metrics(s)[("nv_trt_llm_request_metrics", "active")]) for s in (a, b))
    return n if sum(n) == 8 else None


def _kill(server) -> None:
    """SIGKILL to the server's whole process group (tritonserver and its python stubs): a crash."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)


def test_two_replicas_share_the_load_and_survive_one_dying(smol_server, second_server):
    a, b = smol_server, second_server
    replicas = [a.grpc_url, b.grpc_url]
    served = {s: _requests_served(s) for s in (a, b)}

    # 1. 16 requests from the blocking client (its pooled connections each balance) spread over both.
    with Client(replicas, retries=3, backoff_s=0.05) as c:
        for _ in range(16):
            assert c.complete("Say something.", max_tokens=4).completion_tokens == 4
    spread = {s: _requests_served(s) - served[s] for s in (a, b)}
    assert sum(spread.values()) == 16 and min(spread.values()) >= 4, spread

    async def run():
        async with AsyncClient(replicas, retries=3, backoff_s=0.05, timeout_s=60) as c:
            # A new channel sends its first calls to the first replica it reaches; by the time these have
            # been answered one after another it is connected to both.
            for _ in range(4):
                await c.complete("Say something.", max_tokens=2)
            # 2. 8 long streams, all running on the two replicas; then one replica dies.
            started = [asyncio.Event() for _ in range(8)]

            async def long_stream(i: int):
                chunks, last = 0, None
                try:
                    async for last in c.stream_text("Once upon a time", max_tokens=400, min_tokens=400):
                        chunks += 1
                        started[i].set()
                    return last.completion_tokens
                except UnavailableError as e:
                    return e, chunks

            running = [asyncio.create_task(long_stream(i)) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            on_b = await asyncio.to_thread(wait_for, lambda: _active(a, b), 10, "all 8 streams in the two engines")
            await asyncio.to_thread(_kill, b)
            # 3. Requests sent right after the crash, while the client may still believe in the dead replica.
            after = [asyncio.create_task(c.complete("Say something.", max_tokens=4)) for _ in range(16)]
            streams = await asyncio.wait_for(asyncio.gather(*running), 120)
            return on_b[1], streams, await asyncio.wait_for(asyncio.gather(*after, return_exceptions=True), 120)

    on_b, streams, after = asyncio.run(run())
    broken = [s for s in streams if isinstance(s, tuple)]
    assert on_b >= 1 and len(broken) == on_b, (on_b, streams)  # exactly the streams that ran on the dead one
    for error, tokens in broken:
        assert isinstance(error, UnavailableError) and tokens >= 1, (error, tokens)
    assert all(s == 400 for s in streams if not isinstance(s, tuple)), streams  # the others ran to the end
    assert all(not isinstance(r, BaseException) and r.completion_tokens == 4 for r in after), \
        [str(r) for r in after if isinstance(r, BaseException)]
    assert a.ready()
