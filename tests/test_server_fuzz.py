"""200 fuzzed and malformed prompts against a running `kinema serve`: each answered 4xx with a message
(never 500, never a validator crash), and the server, its worker and its queue still serving afterwards."""

from __future__ import annotations

import copy
import json
import random
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_server import Server, image_prompt, messages_until_done, read_png  # noqa: E402
from server_stub import colour  # noqa: E402

# Values ComfyUI's validation refuses for each input type (it casts with int() / float() / str(), so 3.5 or
# True for an INT and 7 for a STRING are accepted there, and here).
WRONG = {
    "INT": ["seven", "", -1, 2**40, 10**30, -(10**30), None, [], {}, [1], ["1"], ["1", 0, 0], {"a": 1}, [None, 0],
            1e308, "1e400", "\x00"],
    "FLOAT": ["fast", "", -1, 11, 1e308, -1e308, None, [], {}, [2], ["1", 0, 0], {"a": 1}, "nan?"],
    "STRING": [[], {}, [1], ["1", 0, 0], {"a": 1}, ["", 0], [None, None]],
}
TYPES = {"value": "INT", "seed": "INT", "steps": "INT", "delay": "FLOAT", "width": "INT", "height": "INT",
         "filename_prefix": "STRING"}


def bodies(rng: random.Random):
    """(description, raw body bytes) x 200."""
    base = image_prompt(1, steps=1, delay=0)
    out = []

    def add(what, prompt=None, raw=None, **extra):
        if raw is None:
            raw = json.dumps({"prompt": prompt, **extra}).encode()
        out.append((what, raw))

    # wrong types and out-of-range values, for every input of both nodes
    for nid, name in [("1", "value"), ("2", "seed"), ("2", "steps"), ("2", "delay"), ("2", "width"), ("2", "height"),
                      ("2", "filename_prefix")]:
        choices = WRONG[TYPES[name]]
        for v in rng.sample(choices, min(8, len(choices))):
            p = copy.deepcopy(base)
            p[nid]["inputs"][name] = v
            add(f"{nid}.{name}={v!r:.40}", p)
    # missing inputs, missing links, bad slots
    for name in ("seed", "steps", "delay", "filename_prefix"):
        p = copy.deepcopy(base)
        del p["2"]["inputs"][name]
        add(f"missing {name}", p)
    for link in (["9", 0], ["1", 5], ["1", -1], ["1", "0"], ["1"], [1, 0, 2], ["2", 0], [None, None], [["1", 0], 0]):
        p = copy.deepcopy(base)
        p["2"]["inputs"]["seed"] = link
        add(f"link {link}", p)
    # cycles
    for n in (2, 3, 7):
        p = {str(i): {"class_type": "KinemaTestNumber", "inputs": {"value": [str((i + 1) % n), 0]}} for i in range(n)}
        p["out"] = {"class_type": "KinemaTestSlowImage", "inputs": {**base["2"]["inputs"], "seed": ["0", 0]}}
        add(f"cycle of {n}", p)
    # unknown class types, malformed nodes
    for bad in ({"class_type": "NoSuchNode", "inputs": {}}, {"class_type": 5, "inputs": {}}, {"inputs": {}},
                {"class_type": "KinemaTestSlowImage"}, {"class_type": "KinemaTestSlowImage", "inputs": []},
                {"class_type": None, "inputs": None}, "node", 7, None, [], {"class_type": ["KinemaTestSlowImage"]},
                {"class_type": "KinemaTestSlowImage", "inputs": {"seed": {"$ref": "1"}}}):
        add(f"node {bad!r:.40}", {"1": base["1"], "2": bad})  # the only output node is the broken one
    # not a prompt at all
    for prompt in ([], "x", 5, None, {}, [base], {"1": base["1"]}, True):
        add(f"prompt {prompt!r:.30}", prompt)
    add("no prompt key", raw=b'{"client_id": "x"}')
    add("extra_data a list", base, extra_data=[1])
    add("client_id a number", base, client_id=5)
    add("number a string", base, number="first")
    add("prompt_id a dict", base, prompt_id={"a": 1})
    # deep nesting, big shapes, many nodes
    for depth in (70, 500, 100000):
        add(f"nested {depth}", raw=b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")
    deep = {"x": 0}
    for _ in range(80):
        deep = {"x": deep}
    p = copy.deepcopy(base)
    p["2"]["inputs"]["filename_prefix"] = deep
    add("nested value", p)
    many = {str(i): {"class_type": "KinemaTestNumber", "inputs": {"value": i}} for i in range(5000)}
    add("5000 nodes", many)
    add("NaN", raw=json.dumps({"prompt": base}).replace('"delay": 0', '"delay": NaN').encode())
    add("Infinity", raw=json.dumps({"prompt": base}).replace('"delay": 0', '"delay": Infinity').encode())
    # not JSON
    for raw in (b"", b"{", b"not json", b"\xff\xfe\x00garbage", b'{"prompt": {"1": }', b"[1, 2", b"null", b"42",
                b'"prompt"', json.dumps({"prompt": base}).encode()[:-3], b"\x00" * 64, "{\"prompt\": \"\ud800\"}".encode("utf-8", "surrogatepass")):
        add(f"raw {raw[:20]!r}", raw=raw)
    # random structural mutations until there are 200
    while len(out) < 199:
        p = copy.deepcopy(base)
        nid = rng.choice(list(p))
        name = rng.choice(list(p[nid]["inputs"]))
        roll = rng.random()
        if roll < 0.3:
            p[nid]["inputs"][name] = rng.choice(WRONG[TYPES[name]])
        elif roll < 0.5:
            p[nid]["inputs"][name] = [rng.choice(["1", "2", "x", "", None]), rng.choice([0, 1, -1, "0", 99])]
        elif roll < 0.7:
            p[nid]["class_type"] = rng.choice(["", "kinematestnumber", "KSampler ", "__import__", "../x"])
        elif roll < 0.85:
            p[str(rng.randint(3, 9))] = {"class_type": "KinemaTestNumber", "inputs": {"value": ["2", 0]}}
            p["2"]["inputs"]["seed"] = ["2", 0]
        else:
            text = json.dumps({"prompt": p}).encode()
            cut = rng.randint(1, len(text) - 1)
            add("truncated", raw=text[:cut])
            continue
        if p == base:
            continue
        add(f"mutation {nid}.{name}", p)
    out.append(("17 MiB", b'{"prompt": "' + b"x" * (17 << 20) + b'"}'))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz")).wait_ready()
    yield s
    s.stop()


def test_fuzzed_prompts_are_refused_and_the_server_keeps_serving(server):
    cases = bodies(random.Random(15))
    assert len(cases) == 200
    refused, crashes = 0, []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for what, raw in cases:
            r = client.post("/prompt", content=raw, headers={"content-type": "application/json"})
            if not 400 <= r.status_code < 500:
                crashes.append((what, r.status_code, r.text[:300]))
                continue
            body = r.json()
            message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error")
            assert message, (what, body)
            if r.status_code == 400:
                assert "node_errors" in body, (what, body)
            # a refusal the validator reached by crashing is a bug there, not a validation
            if body["error"].get("type") == "exception_during_validation" or "internal:" in str(body["error"].get("details")):
                crashes.append((what, r.status_code, r.text[:300]))
            refused += 1
    assert not crashes, crashes
    assert refused == 200
    assert httpx.get(server.url + "/queue").json() == {"queue_running": [], "queue_pending": []}
    assert httpx.get(server.url + "/history").json() == {}
    # still serving: a good prompt runs to the end
    cid = uuid.uuid4().hex
    ws = server.ws(cid)
    ws.recv()
    r = server.post(image_prompt(42, steps=2, delay=0), cid)
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    msgs = messages_until_done(ws, pid)
    assert any(isinstance(m, dict) and m["type"] == "execution_success" for m in msgs)
    image = httpx.get(f"{server.url}/history/{pid}").json()[pid]["outputs"]["2"]["images"][0]
    assert (read_png(server.output / image["filename"]) == np.array(colour(42), np.uint8)).all()
    ws.close()
    assert server.proc.poll() is None
