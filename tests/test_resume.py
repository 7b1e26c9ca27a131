"""Long runs survive (issue 16), part two: exact resume after kill -9, SIGTERM / Ctrl-C, non-finite losses, a final
save that fails. Real processes, real signals, a real small file system; the shipped base on PushCube, shrunk."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RECIPES
from helpers import free_port
from safetensors.torch import load_file, save_file

from rvla_peft.adapters import AdapterFolderError, check_adapter_folder
from rvla_peft.callbacks import TrainerCallback
from rvla_peft.config import ConfigError, load_config
from rvla_peft.run_folder import check_output_dir, check_resume_recipe, checkpoints, resolve_resume
from rvla_peft.utils.constants import (
    ADAPTER_WEIGHTS,
    METRICS_FILE,
    RECIPE_FILE,
    TENSORBOARD_RUN,
    TRAINER_STATE,
    VALUE_HEAD_FILE,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(RECIPES / "tiny_cpu.yaml")
# Six short updates with a checkpoint every two; one torch thread so that every process computes the same bits.
SHORT = ["total_updates=6", "save_every=2", "eval_episodes=0", "env.num_envs=2", "env.max_episode_steps=12",
         "ppo.num_steps=8", "ppo.num_minibatches=2"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
WEIGHT_FILES = (ADAPTER_WEIGHTS, VALUE_HEAD_FILE)


def _command(out: Path, *extra: str, ranks: int = 1) -> list[str]:
    if ranks == 1:
        launcher = [sys.executable, "-m", "rvla_peft.train"]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
                    "-m", "rvla_peft.train"]  # fmt: skip
    return [*launcher, TINY, f"output_dir={out}", *SHORT, *extra]


def _run(out: Path, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    cmd = _command(out, *extra, ranks=ranks)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV, stdin=subprocess.DEVNULL)


def _start(out: Path, *extra: str, ranks: int = 1) -> subprocess.Popen:
    """A run in its own process group, as a shell runs a job: a signal to the group reaches every process."""
    return subprocess.Popen(
        _command(out, *extra, ranks=ranks), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _wait_until(ready, what: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    _wait_until(path.exists, f"{path} appeared", proc, timeout)


def _wait_for_lines(path: Path, lines: int, proc: subprocess.Popen) -> None:
    def ready() -> bool:
        return path.exists() and len(path.read_text().splitlines()) >= lines

    _wait_until(ready, f"{path} had {lines} lines", proc)


def _kill_all(proc: subprocess.Popen) -> None:
    """kill -9 the run and every process under it, as a lost node would: torchrun starts its ranks in sessions
    of their own, so a signal to the launcher's process group does not reach them."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            parents.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += parents.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in tree:  # gone (or a zombie holding no lock) before the next run starts
        while _alive(pid):
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _metric_updates(out: Path) -> list[int]:
    return [json.loads(line)["update"] for line in (out / METRICS_FILE).read_text().splitlines()]


def _assert_same_weights(a: Path, b: Path) -> None:
    for name in WEIGHT_FILES:
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}: {key} differs"


def _kill9_then_resume(tmp_path: Path, ranks: int) -> None:
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    extra = ["report_to=[tensorboard]"] if ranks == 1 else ["report_to=[]"]
    done = _run(reference, *extra, ranks=ranks)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = _start(resumed, *extra, ranks=ranks)
    _wait_for(resumed / "checkpoints" / "update-000002" / TRAINER_STATE, proc)
    if ranks == 1:  # an update logged after the checkpoint, which the resumed run logs again
        _wait_for_lines(resumed / METRICS_FILE, 3, proc)
    _kill_all(proc)
    assert not (resumed / "adapter").exists(), "killed too late: the run had finished"

    again = _run(resumed, *extra, ranks=ranks)  # without --resume: refused (accelerate launch exits 1), untouched
    assert again.returncode == (2 if ranks == 1 else 1) and "--resume" in again.stderr, again.stderr[-2000:]

    result = _run(resumed, "--resume", *extra, ranks=ranks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout
    _assert_same_weights(reference / "adapter", resumed / "adapter")
    assert _metric_updates(resumed) == list(range(1, 7)), "one line per update, none twice"
    ours = [json.loads(line) for line in (resumed / METRICS_FILE).read_text().splitlines()]
    theirs = [json.loads(line) for line in (reference / METRICS_FILE).read_text().splitlines()]
    for a, b in zip(ours, theirs, strict=True):  # the same run: every logged number but the timings
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: v for k, v in b.items() if not k.startswith("time/")
        }
    if ranks == 1:  # TensorBoard too: each update once, the resumed run's (purge_step hides the killed run's)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(resumed / TENSORBOARD_RUN))
        events.Reload()
        logged = [(e.step, e.value) for e in events.Scalars("ppo/approx_kl")]
        assert logged == [(a["update"], pytest.approx(a["ppo/approx_kl"], rel=1e-6)) for a in ours]


@pytest.mark.integration
def test_kill9_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    _kill9_then_resume(tmp_path, ranks=1)


@pytest.mark.integration
def test_two_rank_resume_equals_an_uninterrupted_run(tmp_path):
    _kill9_then_resume(tmp_path, ranks=2)


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_leaves_a_loadable_adapter_and_a_resumable_checkpoint(tmp_path, signum):
    out = tmp_path / "run"
    short = ["report_to=[]", "save_every=0", "env.vectorization=async", "total_updates=4"]
    proc = _start(out, *short)
    _wait_for(out / METRICS_FILE, proc)  # the first update is done
    os.killpg(proc.pid, signum)  # the whole group, as a terminal's Ctrl-C or a scheduler does: env workers too
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    line = next(x for x in stderr.splitlines() if x.startswith("Stopped by"))
    assert signal.Signals(signum).name in line and "--resume" in line
    state = json.loads((out / "adapter" / TRAINER_STATE).read_text())
    assert state["interrupted"] and 1 <= state["update"] < 4
    (checkpoint,) = checkpoints(out)
    assert json.loads((checkpoint / TRAINER_STATE).read_text())["update"] == state["update"]
    _assert_same_weights(checkpoint, out / "adapter")

    from rvla_peft.policies.registry import load_policy

    load_policy(None, out / "adapter")  # loadable as it is
    from rvla_peft.cli.hub import main as hub_main

    assert hub_main(["card", str(out), "--out", str(tmp_path / "card")]) == 0  # its card says it was interrupted
    card = (tmp_path / "card" / "README.md").read_text()
    assert f"**Interrupted**: training was stopped (a signal) after PPO update {state['update']} of 4" in card

    with pytest.raises(ConfigError, match="interrupted run.*--resume"):
        check_output_dir(load_config(TINY, [f"output_dir={out}"]))
    result = _run(out, "--resume", *short)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _metric_updates(out) == list(range(1, 5))
    assert not json.loads((out / "adapter" / TRAINER_STATE).read_text())["interrupted"]


@pytest.mark.integration
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, "report_to=[]", "total_updates=50")
    _wait_for(out / METRICS_FILE, proc)  # update 1 is logged; its stop check and the next update follow
    # Both signals inside update 2 (several seconds): sent at once, the first could reach update 1's stop check and
    # the second land after that checkpoint was written, while the envs closed (a failure seen in CI).
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr[-2000:]


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, on purpose
def test_a_second_ctrl_c_swallowed_by_a_finaliser_still_stops_at_the_next_poll():
    from rvla_peft.utils.signals import StopOnSignal

    class Finalised:  # SAPIEN's scenes have a __del__: a handler that runs there raises into it, and Python ignores it
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.poll() == signal.SIGINT  # the first: stop at the next safe point
        Finalised()  # the second, swallowed ("Exception ignored in ... __del__")
        with pytest.raises(KeyboardInterrupt):
            stop.poll()


# ----------------------------------------------------------------------------------------------------------------
# resume checks (no training)


def test_resume_refuses_a_changed_recipe_and_a_missing_checkpoint(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "resume_from_checkpoint=latest"])
    with pytest.raises(ConfigError, match="no checkpoint in"):
        resolve_resume(cfg)
    checkpoint = tmp_path / "checkpoints" / "update-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"update": 4}))
    (checkpoint / RECIPE_FILE).write_text("seed: 0\ntotal_updates: 20\nppo: {learning_rate: 0.0001}\n")
    assert resolve_resume(cfg) == checkpoint
    with pytest.raises(ConfigError, match="holds checkpoints of an unfinished run.*--resume"):
        check_output_dir(load_config(TINY, [f"output_dir={tmp_path}"]))
    check_resume_recipe({"seed": 0, "total_updates": 40, "ppo": {"learning_rate": 1e-4}}, checkpoint)  # longer: ok
    with pytest.raises(ConfigError, match=r"save_every: x ppo.num_steps \(1 x 8\) is shorter than an episode"):
        load_config(TINY, ["save_every=1", "ppo.num_steps=8"])  # episodes restart at checkpoints: none would end
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1"):
        check_resume_recipe({"seed": 1, "total_updates": 20, "ppo": {"learning_rate": 1e-4}}, checkpoint)


# ----------------------------------------------------------------------------------------------------------------
# non-finite losses, in process (a fault injected into one loss term of a real trainer)


def _nan_trainer(cfg, poisoned_calls: set[int], monkeypatch):
    """A trainer whose objective returns a NaN Jacobian term at the given calls (1-based)."""
    import rvla_peft.trainer
    from rvla_peft.objective import compute_losses

    calls = 0

    def poisoned(*args, **kwargs):
        nonlocal calls
        losses = compute_losses(*args, **kwargs)
        calls += 1
        if calls in poisoned_calls:
            jac = losses.stats["loss/jacobian"]
            losses.stats["loss/jacobian"] = jac * float("nan")
            losses.total = losses.total + losses.stats["loss/jacobian"]
        return losses

    monkeypatch.setattr(rvla_peft.trainer, "compute_losses", poisoned)
    return rvla_peft.trainer.RobustPPOTrainer(cfg)


def _short_cfg(tmp_path, *extra):
    return load_config(TINY, [f"output_dir={tmp_path / 'run'}", "report_to=[]", *SHORT, "save_every=0",
                              "total_updates=3", "ppo.update_epochs=1", "ppo.target_kl=null", *extra])  # fmt: skip


def test_a_non_finite_loss_is_skipped_and_the_run_ends_finite(tmp_path, capsys, monkeypatch):
    cfg = _short_cfg(tmp_path)
    trainer = _nan_trainer(
        cfg, poisoned_calls={3}, monkeypatch=monkeypatch
    )  # update 2's first minibatch (2 minibatches per update)
    before = {}

    class WeightsUnchangedWhenSkipped(TrainerCallback):
        def on_before_optimizer_step(self, trainer):
            before.update({n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad})

        def on_optimizer_step(self, trainer, stepped):
            if not stepped:  # the weights are exactly as they were
                for n, p in trainer.policy.named_parameters():
                    if p.requires_grad:
                        assert torch.equal(p, before[n]), n
                skipped.append(trainer.update_index + 1)

    skipped = []
    trainer.callbacks.callbacks.append(WeightsUnchangedWhenSkipped())
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [m["train/skipped_steps"] for m in lines] == [0, 1, 0]
    assert [m["ppo/optimizer_steps"] for m in lines] == [2, 1, 2]
    assert "update 2: non-finite loss/jacobian; optimizer step skipped" in capsys.readouterr().err
    check_adapter_folder(tmp_path / "run" / "adapter")  # finite: it would raise otherwise
    assert trainer.skipped_steps == 1 and skipped == [2]


def test_consecutive_non_finite_losses_stop_the_run_and_nothing_is_written(tmp_path, monkeypatch):
    from rvla_peft.trainer import NonFiniteError

    cfg = _short_cfg(tmp_path, "max_consecutive_skips=2")
    trainer = _nan_trainer(cfg, poisoned_calls={2, 3}, monkeypatch=monkeypatch)
    with pytest.raises(NonFiniteError, match=r"update 2: non-finite loss/jacobian, 2 optimizer steps in a row"):
        trainer.train()
    assert not (tmp_path / "run" / "adapter").exists()


def test_eval_and_hub_refuse_an_adapter_with_a_non_finite_weight(tmp_path):
    from rvla_peft.adapters import HubError
    from rvla_peft.hub.run_files import RunFiles

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / RECIPE_FILE).write_text("seed: 0\n")
    save_file({"a.lora_A.weight": torch.tensor([[1.0, float("nan")]])}, str(adapter / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterFolderError, match=r"a\.lora_A\.weight holds NaN or infinite values"):
        check_adapter_folder(adapter)
    with pytest.raises(HubError, match="NaN"):
        RunFiles.find(adapter)


# ----------------------------------------------------------------------------------------------------------------
# a final save that fails


def test_a_full_disk_at_the_final_save_keeps_the_trained_state(tmp_path, tmpfs):
    from rvla_peft.trainer import RobustPPOTrainer, SaveError

    disk = tmpfs("4m")
    cfg = load_config(TINY, [f"output_dir={disk / 'run'}", "report_to=[]", *SHORT, "save_every=0",
                             "total_updates=1"])  # fmt: skip

    class FillsTheDisk(RobustPPOTrainer):
        def save_adapter(self, interrupted=False):
            with open(disk / "filler", "wb") as f:  # another job fills the disk just before the save
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
            return super().save_adapter(interrupted)

    trainer = FillsTheDisk(cfg)
    with pytest.raises(SaveError, match="No space left on device") as error:
        trainer.train()
    message = str(error.value)
    rescue = Path(message.split("the trained state is saved in ")[1].split(":")[0])
    assert rescue.is_dir() and not str(rescue).startswith(str(disk)), message
    assert not [p for p in (disk / "run").iterdir() if p.name.endswith(".tmp")], "no hidden staging folder is left"
    trained = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}

    (disk / "filler").unlink()  # space again: resuming from the rescue checkpoint writes the adapter
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = RobustPPOTrainer(load_config(TINY, [f"output_dir={disk / 'run'}", "report_to=[]", *SHORT,
                                                  "save_every=0", "total_updates=1",
                                                  f"resume_from_checkpoint={rescue}"]))  # fmt: skip
    resumed.train()
    for n, p in resumed.policy.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n
    check_adapter_folder(disk / "run" / "adapter")


def test_an_adapter_written_by_another_run_meanwhile_is_not_replaced(tiny_cfg):
    from rvla_peft.trainer import RobustPPOTrainer

    class Intruded(RobustPPOTrainer):
        def save_adapter(self, interrupted=False):
            theirs = Path(self.cfg.output_dir) / "adapter"
            theirs.mkdir(parents=True, exist_ok=True)
            (theirs / ADAPTER_WEIGHTS).write_bytes(b"another run's adapter")  # a run that ignored the lock
            return super().save_adapter(interrupted)

    with pytest.raises(ConfigError, match="already holds an adapter"):
        Intruded(tiny_cfg).train()
    assert (Path(tiny_cfg.output_dir) / "adapter" / ADAPTER_WEIGHTS).read_bytes() == b"another run's adapter"
