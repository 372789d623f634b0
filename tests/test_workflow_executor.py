"""The workflow executor on stand-in nodes: order, caching across prompts, ComfyUI's messages, errors,
cancel; validation error types one by one, fuzzed prompts; `kinema run` end to end."""

import json
import random
import threading
import time
from pathlib import Path

import pytest

import kinema.workflow.nodes  # noqa: F401  (the real nodes first; stand-ins never shadow them)
from kinema.errors import Cancelled, KinemaError
from kinema.workflow.executor import Executor, WorkflowError
from kinema.workflow.types import FLOAT, INT, LINK, NODES, STRING, CHOICE, NodeOutput, node
from kinema.workflow.validate import MAX_NODES, PromptError, validate_prompt

CALLS: list[str] = []  # class types in the order they ran
STANDINS = []


def standin(class_type, **kw):
    def register(fn):
        assert class_type not in NODES, f"stand-in {class_type} would shadow a real node"
        node(class_type, **kw)(fn)
        STANDINS.append(class_type)
        return fn
    return register


@standin("T_Const", required={"value": INT(1, min=-100, max=100)}, outputs=("NUMBER",))
def t_const(ctx, value):
    CALLS.append("T_Const")
    return (value,)


@standin("T_Seed", required={"seed": INT(0, min=0, max=2**32, control_after_generate=True),
                             "x": LINK("NUMBER")}, outputs=("NUMBER",))
def t_seed(ctx, seed, x):
    CALLS.append("T_Seed")
    return (x * 1000 + seed,)


@standin("T_Add", required={"a": LINK("NUMBER"), "b": LINK("NUMBER")}, optional={"scale": FLOAT(1.0, min=0, max=10)},
         outputs=("NUMBER",))
def t_add(ctx, a, b, scale=1.0):
    CALLS.append("T_Add")
    return ((a + b) * scale,)


@standin("T_Out", required={"x": LINK("NUMBER")}, optional={"label": STRING("")}, output_node=True,
         hidden={"prompt": "PROMPT", "unique_id": "UNIQUE_ID"})
def t_out(ctx, x, label="", prompt=None, unique_id=None):
    CALLS.append("T_Out")
    assert prompt[unique_id]["class_type"] == "T_Out"
    return NodeOutput((), {"values": [x], "label": [label]})


@standin("T_Pick", required={"mode": CHOICE(["a", "b"]), "name": CHOICE(lambda ctx: ctx.folders.list("vae"))},
         outputs=("NUMBER",))
def t_pick(ctx, mode, name):
    CALLS.append("T_Pick")
    return (len(name),)


def _broken_list(ctx):
    raise OSError("the models folder cannot be read")


@standin("T_Broken", required={"name": CHOICE(_broken_list)}, outputs=("NUMBER",))
def t_broken(ctx, name):
    return (0,)


@standin("T_Fail", required={"x": LINK("NUMBER")}, optional={"message": STRING("bad value")}, outputs=("NUMBER",))
def t_fail(ctx, x, message="bad value"):
    CALLS.append("T_Fail")
    raise KinemaError(f"T_Fail: {message}")


FLAKY = {"fail": True}


@standin("T_Flaky", required={"x": LINK("NUMBER")}, outputs=("NUMBER",))
def t_flaky(ctx, x):
    CALLS.append("T_Flaky")
    if FLAKY["fail"]:
        raise RuntimeError("flaky hardware")
    return (x,)


CTRL_C_AT = {"step": None}  # the step at which T_Slow presses Ctrl-C (SIGINT to this process)


@standin("T_Slow", required={"x": LINK("NUMBER"), "steps": INT(5, min=1, max=1000)}, outputs=("NUMBER",))
def t_slow(ctx, x, steps):
    import os
    import signal

    CALLS.append("T_Slow")
    for i in range(steps):
        if ctx.cancel.is_set():
            raise Cancelled("stopped")
        if i == CTRL_C_AT["step"]:
            CTRL_C_AT["step"] = None
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        ctx.progress(i + 1, steps, preview="frame" if i == 0 else None)
    return (x,)


def _mtime(ctx, path):
    return Path(path).stat().st_mtime_ns


@standin("T_File", required={"path": STRING("")}, outputs=("NUMBER",), fingerprint=_mtime)
def t_file(ctx, path):
    CALLS.append("T_File")
    return (int(Path(path).read_text()),)


@standin("T_Save", required={"x": LINK("NUMBER"), "filename_prefix": STRING("t")}, output_node=True)
def t_save(ctx, x, filename_prefix):
    CALLS.append("T_Save")
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    name = f"{filename_prefix}_{x}.txt"
    (ctx.output_dir / name).write_text(str(x))
    return NodeOutput((), {"images": [{"filename": name, "subfolder": "", "type": "output"}]})


@pytest.fixture(autouse=True, scope="module")
def _cleanup():
    yield
    for name in STANDINS:
        NODES.pop(name, None)


class Folders:
    def list(self, kind):
        return ["a.safetensors", "bb.safetensors"] if kind == "vae" else []


@pytest.fixture
def ex(tmp_path):
    CALLS.clear()
    return Executor(Folders(), tmp_path / "output")


def chain(seed=7, value=2, out_label="x"):
    return {
        "1": {"class_type": "T_Const", "inputs": {"value": value}},
        "2": {"class_type": "T_Seed", "inputs": {"seed": seed, "x": ["1", 0]}},
        "3": {"class_type": "T_Const", "inputs": {"value": 5}},
        "4": {"class_type": "T_Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
        "5": {"class_type": "T_Out", "inputs": {"x": ["4", 0], "label": out_label}},
    }


class Recorder(list):
    def __call__(self, event, data):
        self.append((event, data))

    def types(self):
        return [e for e, _ in self]

    def of(self, kind):
        return [d for e, d in self if e == kind]


# -- execution ---------------------------------------------------------------------------------------------
def test_order_messages_and_result(ex):
    rec = Recorder()
    ui = ex.execute(chain(), "p1", listener=rec)
    assert ui == {"5": {"values": [2007 + 5], "label": ["x"]}}
    assert CALLS == ["T_Const", "T_Seed", "T_Const", "T_Add", "T_Out"]
    assert rec.types() == ["execution_start", "execution_cached", "executing", "executing", "executing", "executing",
                           "executing", "executed", "execution_success", "executing"]
    start = rec.of("execution_start")[0]
    assert start["prompt_id"] == "p1" and isinstance(start["timestamp"], int)
    assert rec.of("execution_cached")[0]["nodes"] == []
    assert [d["node"] for d in rec.of("executing")] == ["1", "2", "3", "4", "5", None]
    assert rec.of("executing")[0] == {"node": "1", "display_node": "1", "prompt_id": "p1"}
    assert rec.of("executing")[-1] == {"node": None, "prompt_id": "p1"}
    assert rec.of("executed")[0] == {"node": "5", "display_node": "5", "output": ui["5"], "prompt_id": "p1"}
    assert set(rec.of("execution_success")[0]) == {"prompt_id", "timestamp"}


def test_seed_change_reruns_only_downstream(ex):
    ex.execute(chain(seed=7), "a")
    CALLS.clear()
    rec = Recorder()
    ui = ex.execute(chain(seed=7), "b", listener=rec)  # identical: nothing runs, the UI output is still given
    assert CALLS == [] and ui == {"5": {"values": [2012], "label": ["x"]}}
    assert rec.of("execution_cached")[0]["nodes"] == ["1", "2", "3", "4", "5"]
    assert [d["node"] for d in rec.of("executing")] == [None]
    assert rec.of("executed")[0]["output"] == ui["5"]

    rec = Recorder()
    ui = ex.execute(chain(seed=8), "c", listener=rec)
    assert CALLS == ["T_Seed", "T_Add", "T_Out"]
    assert rec.of("execution_cached")[0]["nodes"] == ["1", "3"]
    assert ui["5"]["values"] == [2013]
    CALLS.clear()
    ex.execute(chain(seed=8, out_label="y"), "d")  # a widget of the last node: only it re-runs
    assert CALLS == ["T_Out"]


def test_cache_keeps_the_latest_prompt_only(ex):
    ex.execute(chain(value=2), "a")
    ex.execute(chain(value=3), "b")
    assert len(ex._cache) == 5
    CALLS.clear()
    ex.execute(chain(value=2), "c")  # the first prompt's outputs were dropped with it
    assert CALLS == ["T_Const", "T_Seed", "T_Add", "T_Out"]  # node 3 (value 5) is shared, cached
    ex.reset()
    CALLS.clear()
    ex.execute(chain(value=2), "d")
    assert len(CALLS) == 5


def test_values_coerced_before_running(ex):
    p = chain(seed="9", value=2.0)
    ui = ex.execute(p, "a")
    assert ui["5"]["values"] == [2014]
    assert p["2"]["inputs"]["seed"] == "9"  # the caller's prompt is not changed


def test_fingerprint_reruns_a_changed_file(ex, tmp_path):
    f = tmp_path / "n.txt"
    f.write_text("4")
    p = {"1": {"class_type": "T_File", "inputs": {"path": str(f)}},
         "2": {"class_type": "T_Out", "inputs": {"x": ["1", 0]}}}
    assert ex.execute(p, "a")["2"]["values"] == [4]
    CALLS.clear()
    assert ex.execute(p, "b")["2"]["values"] == [4] and CALLS == []
    f.write_text("6")
    import os
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert ex.execute(p, "c")["2"]["values"] == [6]
    assert CALLS == ["T_File", "T_Out"]


def test_node_error_is_reported_and_raised(ex):
    p = {"1": {"class_type": "T_Const", "inputs": {"value": 1}},
         "2": {"class_type": "T_Fail", "inputs": {"x": ["1", 0], "message": "no such thing"}},
         "3": {"class_type": "T_Out", "inputs": {"x": ["2", 0]}}}
    rec = Recorder()
    with pytest.raises(WorkflowError) as info:
        ex.execute(p, "e1", listener=rec)
    assert info.value.node_id == "2" and info.value.node_type == "T_Fail"
    assert "T_Fail (node 2)" in str(info.value) and "no such thing" in str(info.value)
    err = rec.of("execution_error")[0]
    assert set(err) == {"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type",
                        "traceback", "current_inputs", "current_outputs", "timestamp"}
    assert err["node_id"] == "2" and err["node_type"] == "T_Fail" and err["executed"] == ["1"]
    assert err["exception_message"] == "T_Fail: no such thing" and err["traceback"] == []
    assert err["exception_type"] == "kinema.errors.KinemaError"
    assert err["current_inputs"] == {"x": [1], "message": ["no such thing"]}
    assert rec.types()[-2:] == ["execution_error", "executing"] and rec[-1][1]["node"] is None
    assert "execution_success" not in rec.types()


def test_failed_node_is_not_cached(ex):
    p = {"1": {"class_type": "T_Const", "inputs": {"value": 1}},
         "2": {"class_type": "T_Flaky", "inputs": {"x": ["1", 0]}},
         "3": {"class_type": "T_Out", "inputs": {"x": ["2", 0]}}}
    FLAKY["fail"] = True
    rec = Recorder()
    with pytest.raises(WorkflowError, match="RuntimeError: flaky hardware"):
        ex.execute(p, "a", listener=rec)
    assert rec.of("execution_error")[0]["traceback"]  # not a user error: the traceback goes along
    FLAKY["fail"] = False
    CALLS.clear()
    assert ex.execute(p, "b")["3"]["values"] == [1]
    assert CALLS == ["T_Flaky", "T_Out"]  # T_Const served from the cache, the failed node ran again


def test_progress_preview_and_cancel(ex):
    p = {"1": {"class_type": "T_Const", "inputs": {"value": 1}},
         "2": {"class_type": "T_Slow", "inputs": {"x": ["1", 0], "steps": 50}},
         "3": {"class_type": "T_Out", "inputs": {"x": ["2", 0]}}}
    cancel = threading.Event()
    rec = Recorder()

    def listener(event, data):
        rec(event, data)
        if event == "progress" and data["value"] == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        ex.execute(p, "c1", listener=listener, cancel=cancel)
    progress = rec.of("progress")
    assert progress[0] == {"value": 1, "max": 50, "prompt_id": "c1", "node": "2"}
    assert [d["value"] for d in progress] == [1, 2, 3]
    assert rec.of("preview") == [{"image": "frame", "node": "2"}]
    interrupted = rec.of("execution_interrupted")
    assert len(interrupted) == 1 and isinstance(interrupted[0].pop("timestamp"), int)
    assert interrupted == [{"prompt_id": "c1", "node_id": "2", "node_type": "T_Slow", "executed": ["1"]}]
    assert rec.types()[-1] == "executing" and rec[-1][1]["node"] is None
    assert "T_Out" not in CALLS

    # cancelled before a node starts: stopped between nodes
    CALLS.clear()
    cancel = threading.Event()
    cancel.set()
    rec = Recorder()
    with pytest.raises(Cancelled):
        ex.execute(chain(seed=99), "c2", listener=rec, cancel=cancel)
    assert rec.of("execution_interrupted")[0]["node_id"] == "1" and CALLS == []


def test_ui_format_prompt_runs(ex):
    ui = {"nodes": [
        {"id": 1, "type": "T_Const", "mode": 0, "inputs": [], "outputs": [{"name": "NUMBER", "links": [1]}],
         "widgets_values": [3]},
        {"id": 2, "type": "T_Out", "mode": 0, "inputs": [{"name": "x", "type": "NUMBER", "link": 1}],
         "widgets_values": ["ui"]}],
        "links": [[1, 1, 0, 2, 0, "NUMBER"]]}
    assert ex.execute(ui, "u") == {"2": {"values": [3], "label": ["ui"]}}


def test_object_info(ex):
    info = ex.object_info()
    assert set(info) == set(NODES)
    assert info["T_Pick"]["input"]["required"]["name"][0] == ["a.safetensors", "bb.safetensors"]
    assert info["T_Pick"]["input"]["required"]["mode"] == [["a", "b"], {"default": "a"}]
    assert info["T_Broken"]["input"]["required"]["name"][0] == []  # still listed
    assert info["T_Out"]["output_node"] is True and info["T_Add"]["input_order"] == {"required": ["a", "b"],
                                                                                     "optional": ["scale"]}


# -- validation --------------------------------------------------------------------------------------------
def _refusal(prompt, ctx=None) -> PromptError:
    with pytest.raises(PromptError) as info:
        validate_prompt(prompt, ctx)
    err = info.value
    assert set(err.error) == {"type", "message", "details", "extra_info"}
    json.dumps({"error": err.error, "node_errors": err.node_errors}, allow_nan=False)  # a client can read it
    return err


def _node_error(prompt, node_id, ctx=None) -> dict:
    err = _refusal(prompt, ctx)
    assert err.error["type"] == "prompt_outputs_failed_validation"
    assert err.error["message"] == "Prompt outputs failed validation"
    entry = err.node_errors[node_id]
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    assert entry["class_type"] == prompt[node_id]["class_type"]
    assert entry["dependent_outputs"] == ["5"]
    return entry["errors"][0]


class Ctx:
    folders = Folders()


def test_prompt_level_errors():
    assert _refusal([1, 2]).error["type"] == "invalid_prompt"
    assert _refusal("x").error["type"] == "invalid_prompt"
    assert _refusal({"1": [1, 2]}).error["type"] == "invalid_prompt"
    assert _refusal({"1": {"class_type": "T_Const", "inputs": [1]}}).error["type"] == "invalid_prompt"
    assert _refusal({"1": {"class_type": ["T_Const"], "inputs": {}}}).error["type"] == "invalid_prompt"
    e = _refusal({"1": {"inputs": {}}})
    assert e.error["type"] == "missing_node_type" and e.error["details"] == "Node ID '#1'"
    e = _refusal({"1": {"class_type": "NoSuchNode", "inputs": {}, "_meta": {"title": "My node"}}})
    assert e.error["type"] == "missing_node_type"
    assert e.error["message"] == "Node 'My node' not found. The custom node may not be installed."
    assert e.error["extra_info"] == {"node_id": "1", "class_type": "NoSuchNode", "node_title": "My node"}
    e = _refusal({"1": {"class_type": "T_Const", "inputs": {"value": 1}}})
    assert e.error == {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}
    big = {str(i): {"class_type": "T_Const", "inputs": {"value": 1}} for i in range(MAX_NODES + 1)}
    e = _refusal(big)
    assert e.error["type"] == "invalid_prompt" and str(MAX_NODES) in e.error["details"]


def test_required_input_missing():
    p = chain()
    del p["4"]["inputs"]["b"]
    e = _node_error(p, "4")
    assert e == {"type": "required_input_missing", "message": "Required input is missing", "details": "b",
                 "extra_info": {"input_name": "b"}}
    err = _refusal(p)
    assert set(err.node_errors) == {"4"}  # downstream nodes are invalid but carry no errors of their own
    assert "Required input is missing: b" in str(err) and "T_Add (node 4)" in str(err)


@pytest.mark.parametrize("link", [["9", 0], ["3", 1], ["3", -1], ["3", 0, 1], ["3", "0"], [None, 0], [["3"], 0],
                                  ["3", True]])
def test_bad_linked_input(link):
    p = chain()
    p["4"]["inputs"]["b"] = link
    e = _node_error(p, "4")
    assert e["type"] == "bad_linked_input" and e["details"].startswith("b")


def test_constant_for_a_link_type():
    p = chain()
    p["4"]["inputs"]["b"] = 3
    assert _node_error(p, "4")["type"] == "bad_linked_input"


def test_return_type_mismatch():
    p = chain()
    p["5"]["inputs"]["label"] = ["1", 0]  # NUMBER into a STRING widget
    e = _node_error(p, "5")
    assert e["type"] == "return_type_mismatch"
    assert e["message"] == "Return type mismatch between linked nodes"
    assert e["details"] == "label, received_type(NUMBER) mismatch input_type(STRING)"


@pytest.mark.parametrize("value", ["abc", "5.0", None, [1], {"a": 1}, float("nan"), float("inf"), "9" * 5000])
def test_invalid_input_type(value):
    p = chain()
    p["1"]["inputs"]["value"] = value
    if isinstance(value, list):  # a list is a link
        assert _node_error(p, "1")["type"] == "bad_linked_input"
        return
    e = _node_error(p, "1")
    assert e["type"] == "invalid_input_type" and e["message"] == "Failed to convert an input value to a INT value"


def test_float_nan_refused_and_coercion():
    p = chain()
    p["4"]["inputs"]["scale"] = float("nan")
    assert _node_error(p, "4")["type"] == "invalid_input_type"
    p = chain(seed="12", value=3.0)
    p["4"]["inputs"]["scale"] = 2
    assert validate_prompt(p) == ["5"]
    assert p["2"]["inputs"]["seed"] == 12 and type(p["1"]["inputs"]["value"]) is int
    assert type(p["4"]["inputs"]["scale"]) is float


def test_min_max():
    p = chain(value=101)
    e = _node_error(p, "1")
    assert e["type"] == "value_bigger_than_max" and e["message"] == "Value 101 bigger than max of 100"
    e = _node_error(chain(value=-101), "1")
    assert e["type"] == "value_smaller_than_min" and e["message"] == "Value -101 smaller than min of -100"
    assert _node_error(chain(value=10**400), "1")["type"] == "value_bigger_than_max"


def test_value_not_in_list():
    p = chain()
    p["6"] = {"class_type": "T_Pick", "inputs": {"mode": "c", "name": "a.safetensors"}}
    p["4"]["inputs"]["b"] = ["6", 0]
    e = _node_error(p, "6", Ctx())
    assert e["type"] == "value_not_in_list" and e["message"] == "Value not in list"
    assert e["details"] == "mode: 'c' not in ['a', 'b']"
    p["6"]["inputs"] = {"mode": "a", "name": "zz.safetensors"}  # a file combo evaluated against the folders
    e = _node_error(p, "6", Ctx())
    assert e["type"] == "value_not_in_list" and "zz.safetensors" in e["details"]
    p["6"]["inputs"]["name"] = "bb.safetensors"
    assert validate_prompt(p, Ctx()) == ["5"]


def test_exception_during_validation():
    p = chain()
    p["6"] = {"class_type": "T_Broken", "inputs": {"name": "x"}}
    p["4"]["inputs"]["b"] = ["6", 0]
    e = _node_error(p, "6")
    assert e["type"] == "exception_during_validation" and "cannot be read" in e["details"]


def test_dependency_cycle():
    p = chain()
    p["1"] = {"class_type": "T_Add", "inputs": {"a": ["4", 0], "b": ["3", 0]}}
    err = _refusal(p)
    cyc = {nid for nid, entry in err.node_errors.items() if entry["errors"][0]["type"] == "dependency_cycle"}
    assert cyc == {"1", "2", "4"}
    p = chain()
    p["4"]["inputs"]["a"] = ["4", 0]  # a node feeding itself
    assert _node_error(p, "4")["type"] == "dependency_cycle"


def test_good_outputs_run_and_bad_ones_are_reported():
    p = chain()
    p["6"] = {"class_type": "T_Out", "inputs": {"x": ["7", 0]}}
    p["7"] = {"class_type": "T_Const", "inputs": {"value": 1000}}
    good = validate_prompt(p)
    assert good == ["5"]
    assert good.node_errors["7"]["dependent_outputs"] == ["6"]
    assert good.node_errors["7"]["errors"][0]["type"] == "value_bigger_than_max"


def test_long_chain_no_recursion_limit():
    n = MAX_NODES - 1
    p = {"0": {"class_type": "T_Const", "inputs": {"value": 1}}}
    for i in range(1, n):
        p[str(i)] = {"class_type": "T_Add", "inputs": {"a": [str(i - 1), 0], "b": ["0", 0]}}
    p["out"] = {"class_type": "T_Out", "inputs": {"x": [str(n - 1), 0]}}
    assert validate_prompt(p) == ["out"]


def _fuzz_value(rng, depth=0):
    r = rng.random()
    if depth > 3 or r < 0.25:
        return rng.choice([0, 1, -1, 2**70, -(2**70), 1e308, float("nan"), float("inf"), "", "x", "5", "a", "b",
                           True, None, 3.5, "a.safetensors", "\x00", "é" * 50])
    if r < 0.45:
        return [rng.choice(["1", "2", "3", "9", 1, None, "T_Out"]), rng.choice([0, 1, -1, "0", 2.0, None, 10**20])]
    if r < 0.6:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if r < 0.7:
        return {"__value__": _fuzz_value(rng, depth + 1)} if rng.random() < 0.5 else {"k": _fuzz_value(rng, depth + 1)}
    if r < 0.8:
        v = 0
        for _ in range(rng.randint(50, 400)):
            v = [v]
        return v
    return rng.choice(["T_Const", "T_Add", "T_Out"])


def _fuzz_prompt(rng):
    kinds = ["T_Const", "T_Seed", "T_Add", "T_Out", "T_Pick", "T_Fail"]
    odd_kinds = ["NoSuch", None, 7, ["T_Out"]]
    shape = rng.random()
    if shape < 0.05:
        return rng.choice([None, [], "prompt", 42, [{"class_type": "T_Out"}]])
    prompt = {}
    for i in range(rng.randint(0, 8)):
        if rng.random() < 0.02:
            prompt[str(i)] = _fuzz_value(rng)
            continue
        record = {"class_type": rng.choice(kinds if rng.random() < 0.95 else odd_kinds)}
        if rng.random() < 0.9:
            names = ["value", "seed", "x", "a", "b", "scale", "label", "mode", "name", "junk"]
            record["inputs"] = ({n: _fuzz_value(rng) for n in rng.sample(names, rng.randint(0, 5))}
                                if rng.random() < 0.97 else _fuzz_value(rng))
        if rng.random() < 0.1:
            record["_meta"] = _fuzz_value(rng)
        prompt[str(i) if rng.random() < 0.99 else i] = record
    if rng.random() < 0.5:  # a well-formed part with one fault, so the deep checks are reached
        good = chain()
        fault = rng.random()
        if fault < 0.15:  # a cycle
            good[rng.choice(["1", "3"])] = {"class_type": "T_Add", "inputs": {"a": ["4", 0], "b": ["2", 0]}}
        elif fault < 0.3:  # a combo
            good["6"] = {"class_type": "T_Pick", "inputs": {"mode": _fuzz_value(rng), "name": _fuzz_value(rng)}}
            good["4"]["inputs"]["b"] = ["6", 0]
        else:
            key = rng.choice(list(good))
            name = rng.choice(list(good[key]["inputs"]))
            good[key]["inputs"][name] = _fuzz_value(rng)
        prompt.update(good)
    return prompt


def test_fuzzed_prompts_are_refused_cleanly():
    rng = random.Random(1234)
    kinds, node_kinds = {}, set()
    for _ in range(300):
        prompt = _fuzz_prompt(rng)
        try:
            validate_prompt(prompt, Ctx())
        except PromptError as err:
            kinds[err.error["type"]] = kinds.get(err.error["type"], 0) + 1
            node_kinds.update(e["type"] for entry in err.node_errors.values() for e in entry["errors"])
            json.dumps({"error": err.error, "node_errors": err.node_errors}, allow_nan=False, default=str)
            str(err)
        # a fuzzed prompt that validates must be runnable too: nothing else escapes
    assert sum(kinds.values()) >= 250
    assert {"invalid_prompt", "missing_node_type", "prompt_no_outputs", "prompt_outputs_failed_validation"} <= set(kinds)
    assert {"bad_linked_input", "required_input_missing", "invalid_input_type", "return_type_mismatch",
            "dependency_cycle", "value_not_in_list"} <= node_kinds


def test_fuzzed_prompts_through_the_executor(ex):
    rng = random.Random(99)
    for i in range(60):
        prompt = _fuzz_prompt(rng)
        try:
            ex.execute(prompt, f"f{i}")
        except (PromptError, WorkflowError):
            pass


# -- kinema run --------------------------------------------------------------------------------------------
def _workflow(tmp_path):
    p = {"1": {"class_type": "T_Const", "inputs": {"value": 2}, "_meta": {"title": "Base"}},
         "2": {"class_type": "T_Seed", "inputs": {"seed": 7, "x": ["1", 0]}},
         "3": {"class_type": "T_Save", "inputs": {"x": ["2", 0], "filename_prefix": "clip"}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(p))
    return path


def test_kinema_run(tmp_path, capsys):
    from kinema.cli.main import main

    CALLS.clear()
    wf = _workflow(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(wf), "--output", str(out), "--set", "T_Seed.seed=42", "--set", "Base.value=3"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "clip_3042.txt")] and (out / "clip_3042.txt").read_text() == "3042"
    assert main(["run", str(wf), "--output", str(out), "--set", "3.filename_prefix=\"5\""]) == 0
    assert capsys.readouterr().out.split() == [str(out / "5_2007.txt")]


@pytest.mark.parametrize("args, words", [
    (["--set", "T_Seed.seed=-3"], "Value -3 smaller than min of 0"),
    (["--set", "T_Nope.seed=1"], "no node 'T_Nope'"),
    (["--set", "T_Seed.sed=1"], "has no input 'sed'"),
    (["--set", "seed=1"], "NODE.INPUT=VALUE"),
    (["--set", "1.value=\"x\""], "Failed to convert an input value to a INT value"),
])
def test_kinema_run_refusals(tmp_path, capsys, args, words):
    from kinema.cli.main import main

    wf = _workflow(tmp_path)
    assert main(["run", str(wf), "--output", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_kinema_run_bad_files(tmp_path, capsys):
    from kinema.cli.main import main

    assert main(["run", str(tmp_path / "missing.json")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": "T_Const",\n  "inputs": {"value": 2,}}}')
    assert main(["run", str(bad)]) == 1
    assert "not valid JSON" in (err := capsys.readouterr().err) and "line 2, column" in err
    fail = tmp_path / "fail.json"
    fail.write_text(json.dumps({"1": {"class_type": "T_Const", "inputs": {"value": 2}},
                                "2": {"class_type": "T_Fail", "inputs": {"x": ["1", 0]}},
                                "3": {"class_type": "T_Save", "inputs": {"x": ["2", 0], "filename_prefix": "f"}}}))
    assert main(["run", str(fail), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "T_Fail (node 2): T_Fail: bad value" in err and "Traceback" not in err
    with pytest.raises(WorkflowError):
        main(["run", str(fail), "--output", str(tmp_path / "o"), "--debug"])


def test_kinema_run_ctrl_c_stops_cleanly(tmp_path, capsys):
    from kinema.cli.main import main

    p = {"1": {"class_type": "T_Const", "inputs": {"value": 2}},
         "2": {"class_type": "T_Slow", "inputs": {"x": ["1", 0], "steps": 300}},
         "3": {"class_type": "T_Save", "inputs": {"x": ["2", 0], "filename_prefix": "never"}}}
    wf = tmp_path / "slow.json"
    wf.write_text(json.dumps(p))
    CTRL_C_AT["step"] = 20
    t0 = time.monotonic()
    assert main(["run", str(wf), "--output", str(tmp_path / "out")]) == 130
    assert time.monotonic() - t0 < 3.0  # stopped at a step, not after 300 of them
    err = capsys.readouterr().err
    assert "interrupted" in err and "T_Slow #2" in err  # the node's progress bar was shown
    assert not list((tmp_path / "out").glob("never*"))


def test_deeply_nested_values_are_refused(ex):
    deep = 0
    for _ in range(20000):
        deep = [deep]
    for value in (deep, {"__value__": deep}):
        p = chain()
        p["5"]["inputs"]["label"] = value
        with pytest.raises(PromptError) as info:
            ex.execute(p, "deep")
        json.dumps(info.value.node_errors)
        str(info.value)


def test_non_deterministic_node_always_runs(ex):
    from dataclasses import replace

    NODES["T_Const"] = replace(NODES["T_Const"], deterministic=False)
    try:
        ex.execute(chain(), "a")
        CALLS.clear()
        ex.execute(chain(), "b")
        assert CALLS == ["T_Const", "T_Seed", "T_Const", "T_Add", "T_Out"]  # both constants and all that follows
    finally:
        NODES["T_Const"] = replace(NODES["T_Const"], deterministic=True)
