"""Every module of the package imports first, alone, in a fresh interpreter, and loads no module of a higher layer.

One driver process imports the third-party libraries once (they are not what is checked) and then forks a child per
module; the child imports that one module as the first ``rvla_peft`` module of its life and reports which package
modules the import loaded. The modules are found on disk with ``pkgutil`` (nothing imported), so a module added
later is covered without touching this file."""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_layers import LAYERS, layer_of

PACKAGE = Path(__file__).resolve().parent.parent / "rvla_peft"

# Third-party libraries the driver imports before forking (each child inherits them, so that one import costs
# milliseconds): only libraries, never an rvla_peft module (the driver checks). A library not listed is imported by
# the child that needs it.
PRELOAD = [
    "numpy",
    "yaml",
    "PIL.Image",
    "torch",
    "safetensors.torch",
    "huggingface_hub",
    "accelerate",
    "transformers",
    "transformers.modeling_utils",
    "transformers.processing_utils",
    "transformers.image_processing_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.masking_utils",
]

DRIVER = r"""
import importlib, json, os, sys, traceback
for lib in sys.argv[1].split(","):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not any(m == "rvla_peft" or m.startswith("rvla_peft.") for m in sys.modules), "the driver imported rvla_peft"
for name in sys.argv[2:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one import, then report and leave without running any exit hook
        os.close(read)
        try:
            importlib.import_module(name)
            result = {"loaded": sorted(m for m in sys.modules if m == "rvla_peft" or m.startswith("rvla_peft."))}
        except BaseException:
            result = {"error": traceback.format_exc()}
        with os.fdopen(write, "w") as out:
            out.write(json.dumps(result))
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as inp:
        text = inp.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(text) if text else {"error": f"the child died (wait status {status})"}
    print(json.dumps({"module": name, **result}), flush=True)
"""


def package_modules() -> list[str]:
    """Every module and package of rvla_peft, found on disk (``pkgutil.walk_packages`` would import the packages).
    ``__main__`` modules are scripts (importing one runs its command), so they are left out."""
    names = ["rvla_peft"]

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)], prefix):
            if info.name.rpartition(".")[2] == "__main__":
                continue
            names.append(info.name)
            if info.ispkg:
                walk(path / info.name.rpartition(".")[2], info.name + ".")

    walk(PACKAGE, "rvla_peft.")
    return names


def import_each_first(modules: list[str]) -> dict[str, dict]:
    """{module: {"loaded": [package modules its import loaded]} or {"error": traceback}}, each module imported in
    a child that had imported no rvla_peft module before."""
    if not hasattr(os, "fork"):
        pytest.skip("the driver forks a child per module")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, ",".join(PRELOAD), *modules],
        capture_output=True,
        text=True,
        env=env,
        cwd=PACKAGE.parent,
        timeout=600,
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record.pop("module")] = record
    assert done.returncode == 0 and len(results) == len(modules), f"the driver failed:\n{done.stderr[-3000:]}"
    return results


@pytest.fixture(scope="module")
def imported() -> dict[str, dict]:
    return import_each_first(package_modules())


def test_the_walk_finds_every_module_but_the_scripts():
    modules = package_modules()
    assert {"rvla_peft", "rvla_peft.config", "rvla_peft.config.schema", "rvla_peft.policies.pi0.configuration"} <= set(
        modules
    )
    assert "rvla_peft.hub.__main__" not in modules
    assert len(modules) == len(set(modules)) == sum(1 for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def test_every_module_imports_first_in_a_fresh_interpreter(imported):
    failed = {name: r["error"].strip().splitlines()[-1] for name, r in imported.items() if "error" in r}
    assert not failed, "modules that fail when imported first:\n" + "\n".join(f"{k}: {v}" for k, v in failed.items())


def test_importing_a_module_loads_no_higher_layer(imported):
    """Importing a leaf never runs a higher layer: a package ``__init__`` that re-exported a higher layer, or a
    module-level import pointing up, would load it. A package above a loaded module is loaded by Python on the
    way (``rvla_peft.policies`` above ``rvla_peft.policies.families``); what its ``__init__`` loads is checked."""
    upward = []
    for name, result in imported.items():
        modules = set(result.get("loaded", []))
        for module in sorted(modules - {m.rpartition(".")[0] for m in modules}):
            if layer_of(module) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) loads {module} ({LAYERS[layer_of(module)][0]})")
    assert not upward, "imports that run a higher layer:\n" + "\n".join(upward)


def test_the_driver_reports_a_module_that_fails_first(tmp_path):
    """The check itself: two modules that import each other's names fail when one is imported first, and the
    failure comes back as that module's error rather than ending the run."""
    package = tmp_path / "cyc"
    package.mkdir()
    (package / "__init__.py").write_text("from cyc.a import A\n")
    (package / "a.py").write_text("from cyc.b import B\nA = 1\n")
    (package / "b.py").write_text("from cyc import A\nB = 2\n")
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, "json", "cyc.b", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
        timeout=60,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["module"] for r in records] == ["cyc.b", "json"]
    assert "partially initialized module" in records[0]["error"]
    assert records[1] == {"module": "json", "loaded": []}


BITSANDBYTES_CHECK = r"""
import sys
from rvla_peft.config import load_config
from rvla_peft.policies.registry import build_policy

recipe = "recipes/tiny_cpu.yaml"
build_policy(load_config(recipe, ["report_to=[]"]))
assert "bitsandbytes" not in sys.modules, "an unquantised policy imported bitsandbytes"
print("unquantised: built", file=sys.stderr, flush=True)
policy = build_policy(load_config(recipe, ["report_to=[]", "model.quantization=4bit"]))
from peft.tuners.lora.bnb import Linear4bit  # peft's LoRA over a 4-bit layer: peft saw bitsandbytes again
print("4-bit LoRA layers:", sum(isinstance(m, Linear4bit) for m in policy.peft_model.modules()))
"""


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the quant extra)")
def test_bitsandbytes_is_imported_only_for_a_quantised_model():
    """peft imports bitsandbytes whenever it is installed (and its import logs "Failed to load CPU
    gemm_4bit_forward ..." on some CPUs): building an unquantised policy leaves it out, and a quantised one built
    after it in the same process still gets peft's 4-bit LoRA layers."""
    done = subprocess.run(
        [sys.executable, "-c", BITSANDBYTES_CHECK],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE.parent)},
        cwd=PACKAGE.parent,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split("4-bit LoRA layers:")[1]) > 0
    assert "gemm_4bit_forward" not in done.stderr.split("unquantised: built")[0]  # bitsandbytes' own message
