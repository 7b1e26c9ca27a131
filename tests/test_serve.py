"""The policy server as robots use it: a real ``python -m rvla_peft.serve`` process on 127.0.0.1 serving the
shipped base with the shipped colour adapter (LoRA merged), talked to over real HTTP. OpenVLA's ``POST /act``
contract, the metadata, bad requests (each a 4xx with one line, the server serving on), concurrent clients
answered from shared forwards, and a ManiSkill env driven through the client reaching exactly the episode outcomes
of in-process evaluation on the same reset seeds."""

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rvla_peft.cli import serve as serve_cli
from rvla_peft.serving import json_numpy
from rvla_peft.serving.batching import ActionBatcher
from rvla_peft.serving.client import PolicyClient, PolicyServerError
from rvla_peft.serving.policy import serve_config
from rvla_peft.utils.threads import torch_threads

ROOT = Path(__file__).resolve().parent.parent
BASE, ADAPTER = "builtin:tiny-vla-maniskill", "builtin:tiny-vla-maniskill-color"
TOKEN = "s3cret-token"
MAX_BODY = 2**17  # a 64x64 uint8 image request is ~16.5 kB, a float32 one ~66 kB
INSTRUCTION = "push the cube to the goal region"


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server process; its URL. One torch thread, as the in-process side here, so both compute alike."""
    logs = tmp_path_factory.mktemp("serve")
    out, err = open(logs / "out.txt", "w+"), open(logs / "err.txt", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "rvla_peft.serve", "--base", BASE, "--adapter", ADAPTER, "--port", "0"]
    command += ["--max-batch", "8", "--max-wait-ms", "20", "--token", TOKEN, "--max-body-bytes", str(MAX_BODY)]
    process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT)
    try:
        deadline, url = time.monotonic() + 180, None
        while url is None:
            text = (logs / "out.txt").read_text()
            if "http://" in text:
                url = text.split("http://", 1)[1].split()[0]
            elif process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{(logs / 'err.txt').read_text()[-3000:]}")
            else:
                time.sleep(0.2)
        yield f"http://{url}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.close()
        err.close()


@pytest.fixture(scope="module")
def merged_policy():
    """The policy loaded in process as the server loads it (eval mode); merge it with ``acting()``."""
    from rvla_peft.policies.registry import load_policy

    return load_policy(BASE, ADAPTER).eval()


@pytest.fixture
def client(server):
    with PolicyClient(server, token=TOKEN) as c:
        yield c


def _image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# json-numpy


def test_json_numpy_writes_and_reads_the_json_numpy_packages_format():
    action = np.array([0.5, -1.0, 0.25], dtype=np.float32)
    record = json.loads(json_numpy.dumps({"action": action}))["action"]
    assert record == {"__numpy__": base64.b64encode(action.tobytes()).decode(), "dtype": "<f4", "shape": [3]}
    # what json_numpy.dumps writes for a uint8 image (its dtype descr "|u1") and for a scalar (shape [])
    image = _image(0, 4)
    b64 = lambda a: base64.b64encode(a.tobytes()).decode()
    sent = {
        "image": {"__numpy__": b64(image), "dtype": "|u1", "shape": [4, 4, 3]},
        "x": {"__numpy__": b64(np.float64(2.5)), "dtype": "<f8", "shape": []},
    }
    read = json_numpy.loads(json.dumps(sent))
    assert read["image"].dtype == np.uint8 and np.array_equal(read["image"], image)
    assert isinstance(read["x"], np.float64) and read["x"] == 2.5
    transposed = np.asfortranarray(_image(1, 5))  # not C-contiguous: written in C order all the same
    assert np.array_equal(json_numpy.loads(json_numpy.dumps(transposed)), transposed)
    for bad, message in [
        ({"__numpy__": "AAAA", "dtype": "|O", "shape": [1]}, "only numbers and booleans"),
        ({"__numpy__": "AAAA", "dtype": "nonsense", "shape": [1]}, "dtype descr"),
        ({"__numpy__": "!!", "dtype": "|u1", "shape": [1]}, "not base64"),
        ({"__numpy__": "AAAA", "dtype": "|u1", "shape": [2, 2]}, "3 bytes does not hold |u1 [2, 2]"),
        ({"__numpy__": "AAAA", "dtype": "|u1", "shape": [-3]}, "list of sizes"),
    ]:
        with pytest.raises(ValueError, match=message):
            json_numpy.loads(json.dumps(bad))


# ----------------------------------------------------------------------------------------------------------------
# batching, in-process


def test_the_batcher_answers_each_request_with_its_own_action_and_gathers_concurrent_ones():
    calls = []

    def predict(batch):
        calls.append(list(batch))
        time.sleep(0.05)
        return [2 * x for x in batch]

    batcher = ActionBatcher(predict, max_batch=3, max_wait_s=0.0)
    futures = [batcher.submit(i) for i in range(7)]
    answers = [f.result(timeout=10) for f in futures]
    batcher.close()
    assert [a.action for a in answers] == [2 * i for i in range(7)]
    # the first forward starts with what had queued; the rest waited for it and share forwards of at most 3
    assert sorted(x for call in calls for x in call) == list(range(7)) and max(map(len, calls)) == 3
    assert all(a.batch_size == len(next(c for c in calls if i in c)) for i, a in enumerate(answers))
    assert answers[-1].queue_ms >= 50  # it waited for at least one forward
    failing = ActionBatcher(lambda batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.submit(1).result(timeout=10)
    failing.close()


# ----------------------------------------------------------------------------------------------------------------
# the contract


@pytest.mark.integration
def test_act_health_and_metadata(server, client):
    assert client.health() == {"status": "ok"}
    meta = client.metadata()
    assert meta["family"] == "action_tokens" and meta["base"] == BASE and meta["adapter"] == ADAPTER
    assert meta["image_size"] == [64, 64] and meta["action_shape"] == [7] and meta["chunk_size"] == 1
    assert meta["lora_merged"] and meta["max_batch"] == 8 and meta["task"] == "PushCube-v1"
    report = json.loads((ROOT / "rvla_peft/assets/tiny-vla-maniskill-color/report.json").read_text())
    robustness = meta["robustness"]
    assert robustness["policy"] == "color" and robustness["summary"] == report["summary"]["color"]
    assert "| `color_jitter@0.5` |" in robustness["table"]
    reply = client.act_reply(_image(0), INSTRUCTION)
    action = reply["action"]
    assert isinstance(action, np.ndarray) and action.dtype == np.float32 and action.shape == (7,)
    timing = reply["server_timing"]
    assert timing["batch_size"] >= 1 and 0 < timing["infer_ms"] <= timing["total_ms"] and timing["queue_ms"] >= 0
    # the same request, the same action; a PIL image and an unnorm_key the server has (None) change nothing
    from PIL import Image

    assert np.array_equal(client.act(Image.fromarray(_image(0)), INSTRUCTION), action)
    # OpenVLA's client wraps the json-numpy body as a string under "encoded"
    body = json.dumps({"encoded": json_numpy.dumps({"image": _image(0), "instruction": INSTRUCTION})}).encode()
    status, data = client.request("POST", "/act", body, {"Content-Type": "application/json"})
    assert status == 200 and np.array_equal(json_numpy.loads(data)["action"], action)


@pytest.mark.integration
def test_the_server_answers_what_in_process_predict_action_gives(client, merged_policy):
    """The policy loaded in process as the server loads it, its LoRA merged (acting()), gives for each image the
    action the server returns, bit for bit."""
    policy = merged_policy
    images = [_image(seed) for seed in range(3)]
    with policy.acting():
        expected = [policy.predict_action(image, INSTRUCTION) for image in images]
    for image, action in zip(images, expected, strict=True):
        assert np.array_equal(client.act(image, INSTRUCTION), action)


def _bad_requests():
    good = {"image": _image(3), "instruction": INSTRUCTION}
    numpy_body = lambda **changes: json_numpy.dumps({**good, **changes}).encode()
    without = lambda key: json_numpy.dumps({k: v for k, v in good.items() if k != key}).encode()
    image_record = json.loads(json_numpy.dumps(_image(3)))
    return [
        ("not json", b"{'image': nope", 400, "the body is not JSON"),
        ("not an object", b"[1, 2, 3]", 400, "the body must be a JSON object"),
        ("no image", without("image"), 400, "missing field 'image'"),
        ("no instruction", without("instruction"), 400, "missing field 'instruction'"),
        ("image as a list", json.dumps({**good, "image": [[0, 0, 0]]}).encode(), 400, "json-numpy array"),
        ("float image", numpy_body(image=_image(3).astype(np.float32)), 400, "got float32 of shape [64, 64, 3]"),
        ("grey image", numpy_body(image=_image(3)[..., 0]), 400, "got uint8 of shape [64, 64]"),
        ("another size", numpy_body(image=_image(3, 32)), 400, "image is 32x32, this policy takes 64x64"),
        ("instruction not text", numpy_body(instruction=7), 400, "instruction must be a non-empty string"),
        ("empty instruction", numpy_body(instruction="  "), 400, "instruction must be a non-empty string"),
        ("unnorm_key", numpy_body(unnorm_key="bridge_orig"), 400, "un-normalises with None"),
        (
            "truncated array",
            json.dumps({**good, "image": {**image_record, "__numpy__": image_record["__numpy__"][:-8]}}).encode(),
            400,
            "does not hold |u1 [64, 64, 3]",
        ),
        ("oversized", b"x" * (MAX_BODY + 1), 413, f"at most {MAX_BODY} bytes"),
    ]


@pytest.mark.integration
@pytest.mark.parametrize("name, body, status, message", _bad_requests(), ids=[r[0] for r in _bad_requests()])
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_serves_on(client, name, body, status, message):
    got, data = client.request("POST", "/act", body, {"Content-Type": "application/json"})
    error = json.loads(data)["error"]
    assert got == status and message in error and "\n" not in error, (got, error)
    assert client.act(_image(0), INSTRUCTION).shape == (7,)  # still serving, on the same client


@pytest.mark.integration
def test_the_token_guards_act_and_metadata_but_not_health(server):
    for token in (None, "wrong"):
        with PolicyClient(server, token=token) as anonymous:
            assert anonymous.health() == {"status": "ok"}
            for call in (anonymous.metadata, lambda: anonymous.act(_image(0), INSTRUCTION)):
                with pytest.raises(PolicyServerError) as err:
                    call()
                assert err.value.status == 401 and "Authorization: Bearer" in err.value.reason
    with PolicyClient(server, token=TOKEN) as c:
        status, data = c.request("GET", "/act")
        assert status == 405
        status, data = c.request("GET", "/nothing")
        assert status == 404 and "error" in json.loads(data)


@pytest.mark.integration
def test_concurrent_clients_share_forwards_and_each_gets_its_own_action(server):
    """8 threads, each with its own client and image, at once: batches of more than one request answered, and
    each reply the action its own image gets alone (to a bin: a batch may round a near-tie otherwise)."""
    images = [_image(10 + i) for i in range(8)]
    with PolicyClient(server, token=TOKEN) as c:
        alone = [c.act(image, INSTRUCTION) for image in images]
    bin_width = 2 / 63 + 1e-6  # 64 bins over [-1, 1]
    replies: list = [None] * 8
    start = threading.Barrier(8)

    def run(i):
        with PolicyClient(server, token=TOKEN) as c:
            start.wait()
            replies[i] = [c.act_reply(images[i], INSTRUCTION) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    sizes = [r["server_timing"]["batch_size"] for rs in replies for r in rs]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    for i, rs in enumerate(replies):
        for r in rs:
            assert np.abs(r["action"] - alone[i]).max() <= bin_width


# ----------------------------------------------------------------------------------------------------------------
# closed loop


@pytest.mark.integration
def test_an_env_driven_through_the_client_reaches_the_outcomes_of_in_process_evaluation(server, merged_policy):
    """PushCube through HTTP, one request per step, against the in-process evaluation of the same policy (LoRA
    merged) on the same reset seeds, each on a fresh env (the physics carries state from episode to episode)."""
    from rvla_peft.adapters import adapter_recipe, resolve_adapter
    from rvla_peft.config import load_config
    from rvla_peft.envs import make_envs
    from rvla_peft.evaluation import evaluate_grid
    from rvla_peft.perturbations import CLEAN

    episodes, seed = 4, 2000
    cfg = load_config(adapter_recipe(resolve_adapter(ADAPTER)), ["env.num_envs=1"])
    max_steps = cfg.env.max_episode_steps
    policy = merged_policy
    with make_envs(cfg.env) as env, policy.acting():
        (cell,) = evaluate_grid({"color": policy}, env, [CLEAN], episodes, seed, max_steps)

    success, returns, lengths = [], [], []
    with make_envs(cfg.env) as env, PolicyClient(server, token=TOKEN) as client:
        for e in range(episodes):
            obs = env.reset(seed=seed + e)
            for _ in range(max_steps):
                action = client.act(obs["rgb"][0].numpy(), env.instructions[0])
                step = env.step(torch.from_numpy(action)[None])
                if bool(step.terminated[0] | step.truncated[0]):
                    success.append(bool(step.episode_success[0]))
                    returns.append(float(step.episode_return[0]))
                    lengths.append(int(step.episode_length[0]))
                    break
                obs = step.obs
    assert success == cell.successes and returns == cell.returns, (success, cell.successes)
    assert len(lengths) == episodes and sum(success) >= 1  # the adapter solves PushCube: not a vacuous match
    assert len(set(lengths)) > 1  # episodes of different lengths: the actions steer the episodes


# ----------------------------------------------------------------------------------------------------------------
# the command line


def test_the_command_refuses_bad_arguments_before_loading_a_model(tmp_path, capsys):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert serve_cli.main(["--base", BASE, "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        taken.close()
    assert serve_cli.main(["--adapter", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serve_cli.main(["--base", BASE, "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    # a base made by rvla_peft.pretrain, served without a recipe, decodes as it was trained (its policy.json)
    cfg, local = serve_config(BASE, None)
    assert local is None and cfg.policy.n_bins == 64 and cfg.env.image_size == 64


@pytest.mark.integration
def test_the_console_script_and_the_module_shim_exist():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rvla-serve"] == "rvla_peft.cli.serve:main"
    done = subprocess.run([sys.executable, "-m", "rvla_peft.serve", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0 and "--adapter" in done.stdout and "--max-wait-ms" in done.stdout
