"""A real `dbloom peer` behind a home NAT answers a shim outside it, through a blind relay.

The topology is test_relay_netns.py's (namespaces made and removed here, private
addresses only): `dbloom relay` at 10.77.1.2, the node at 10.77.2.2 behind a MASQUERADE
router (10.77.1.4), and `dbloom shim` with an OpenAI client at 10.77.1.3. The peer holds
a slot on the relay, puts its /p2p-circuit address in its node record, and the shim,
which finds the node through the DHT alone, gets the greedy completion the model gives
locally, while tcpdump on the relay shows the prompt's random marker never passed in
the clear.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
from pathlib import Path

import trio
from test_relay_netns import (
    TCPDUMP,
    Lab,
    build_topology,
    ipv4_hosts,
    settle,
    start_relay,
)

from dbloom.inference import Final, GenerateRequest, MLXEngine, build_tiny_model

MODEL = "tiny"
MAX_TOKENS = 8
ASK = """
import json, sys, time
import openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=20)
deadline = time.monotonic() + 8
while True:
    try:
        reply = client.completions.create(
            model="tiny", prompt=sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0
        )
        break
    except openai.APIStatusError as exc:  # 503 until the shim's lookup finds the node
        if exc.status_code != 503 or time.monotonic() > deadline:
            raise
        time.sleep(0.5)
print("answer", json.dumps(reply.choices[0].text), flush=True)
"""


def dbloom(home: Path, *args: str) -> list[str]:
    """A `dbloom` command line with its own home and no config file."""
    return ["env", "DBLOOM_CONFIG=", sys.executable, "-m", "dbloom.cli", "--home", str(home), *args]


async def local_answer(model: Path, prompt: str) -> str:
    """What the model itself generates greedily for `prompt`: what the shim must return."""
    request = GenerateRequest(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    texts = []
    async with MLXEngine(model, model_id=MODEL) as engine, engine.generate(request) as generation:
        async for item in generation:
            if isinstance(item, Final):
                break
            texts.append(item.text)
    return "".join(texts)


def test_peer_behind_nat_serves_a_shim_through_a_blind_relay(lab: Lab, tmp_path: Path) -> None:
    lab = lab
    model = build_tiny_model(tmp_path / "tiny", size="tiny", seed=0)
    marker = secrets.token_hex(32)
    prompt = f"keep this secret: {marker}"
    expected = trio.run(local_answer, model, prompt)
    assert expected, "the generated model should say something in a few tokens"

    net = build_topology(lab)
    relay = start_relay(lab, net.relay, "10.77.1.2", tmp_path / "relay")
    capture = tmp_path / "relay.pcap"
    tcpdump = lab.start(
        net.relay, TCPDUMP, "-i", "eth0", "-U", "-s", "0", "-B", "16384", "-w", str(capture)
    )
    tcpdump.read_line("tcpdump: listening on", stderr=True)

    peer = lab.start(
        net.node,
        *dbloom(tmp_path / "peer", "peer", "-l", "/ip4/0.0.0.0/tcp/4001", "-b", relay),
        *("-m", str(model), "--no-benchmark", "--always-on", "--reachability", "private"),
    )
    peer.read_line("attestation dev")
    listening = [line.split()[-1] for line in peer.seen if line.startswith("listening on ")]
    assert listening and all("/tcp/4001/p2p/12D3KooW" in addr for addr in listening), peer.seen
    circuit = peer.read_line("reachable at ")
    assert circuit.startswith(f"{relay}/p2p-circuit/p2p/12D3KooW")

    shim = lab.start(
        net.client,
        *dbloom(tmp_path / "shim", "shim", "--port", "0", "--allow-dev", "-b", relay),
    )
    base_url = shim.read_line("OpenAI-compatible API on ")
    ask = lab.start(net.client, sys.executable, "-c", ASK, base_url, prompt, str(MAX_TOKENS))
    assert json.loads(ask.read_line("answer ")) == expected
    assert ask.wait() == 0

    settle(capture, 1)
    tcpdump.stop(signal.SIGINT)
    assert "0 packets dropped by kernel" in tcpdump.drain(stderr=True)
    wire = capture.read_bytes()
    assert b"/noise" in wire
    plain = marker.encode()
    leaks = [plain[i : i + 16] for i in range(len(plain) - 15) if plain[i : i + 16] in wire]
    assert not leaks, "the prompt crossed the relay in the clear"
    assert b"keep this secret" not in wire
    # the relay carried the shim's traffic to the node, which it knows only by its router
    hosts = ipv4_hosts(wire)
    assert {"10.77.1.2", "10.77.1.3", "10.77.1.4"} <= hosts and "10.77.2.2" not in hosts
