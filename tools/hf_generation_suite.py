"""Run transformers' own generation tests with every model patched by fastdecode, and count.

Usage, with a checkout of the transformers repository (its ``tests/`` and ``utils/`` folders; the
release installed in the environment is the one tested)::

    FAMILIES=llama,mistral,qwen2,qwen3,gemma,gemma2,phi3,gpt2,gpt_neox,opt,starcoder2,olmo2,falcon
    python tools/hf_generation_suite.py --checkout /path/to/transformers \\
        --families $FAMILIES,gptj --out suite.json

For each family it runs ``tests/models/<family>/test_modeling_<family>.py`` twice in a fresh
pytest process, keeping only the generation tests (those marked ``generate``, i.e. the
``GenerationTesterMixin`` tests, and every test with ``generate`` in its name):

- ``off``: plain transformers, the baseline;
- ``patch``: every model is patched with ``fastdecode.patch`` as it is built (``post_init``), so
  each ``model.generate`` a test makes goes through ``fastdecode.generate``.

It prints (and writes as JSON) the tests passing in each run, the tests that pass unpatched but
fail patched, and for the patched run how many ``generate`` calls fastdecode's own loop served,
how many fell back to ``model.generate`` (with the reasons fastdecode's warning names, in total
and per test) and how many raised (as HF raises for invalid arguments). The native share is taken
over the calls that do not ask for attention weights (``output_attentions``, which fastdecode's
kernels do not produce): of all of them, and of those that do not raise.

The checkout's ``conftest.py`` needs ``pytest-xdist`` (without it, pytest stops before collecting
anything: "unknown hook 'pytest_configure_node'"), ``parameterized``, ``httpx`` and ``datasets``
installed in the interpreter that runs this script, and ``<checkout>/src/transformers`` must
import the installed release (a symbolic link to it will do). ``--plugins`` adds pytest plugins
to both runs, e.g. a shim for a checkout that is not from the installed release (the checkout's top
folder is on the runs' ``PYTHONPATH``). Each run's pytest output is kept next to ``--out`` (in a
folder of the same name: ``<family>-<mode>.log``); a run that collects nothing stops the script.
This file is also the pytest plugin both runs load.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import transformers

_FALLBACK = "fastdecode.generate: running model.generate instead, because of: "
_STATE = {"mode": "off", "report": None, "tests": {}, "calls": collections.Counter(),
          "reasons": collections.Counter(), "test": None,
          "fallbacks": collections.defaultdict(collections.Counter)}


# --- pytest plugin --------------------------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--fastdecode-mode", choices=("off", "patch"), default="off")
    parser.addoption("--fastdecode-report", default=None)


def pytest_configure(config):
    _STATE["mode"] = config.getoption("--fastdecode-mode")
    _STATE["report"] = config.getoption("--fastdecode-report")
    if _STATE["mode"] == "patch":
        _patch_every_model()
    else:
        _count_plain_calls()


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if i.get_closest_marker("generate") or "generate" in i.name]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def pytest_runtest_setup(item):
    _STATE["test"] = item.nodeid


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _STATE["tests"][report.nodeid] = report.outcome


def pytest_sessionfinish(session):
    if _STATE["report"]:
        Path(_STATE["report"]).write_text(json.dumps(
            {"mode": _STATE["mode"], "tests": _STATE["tests"], "calls": _STATE["calls"],
             "reasons": _STATE["reasons"], "fallbacks": _STATE["fallbacks"]}, indent=1))


def _count_plain_calls():
    from transformers.generation import GenerationMixin

    original = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        _STATE["calls"]["total"] += 1
        return original(self, *args, **kwargs)

    GenerationMixin.generate = generate


def _patch_every_model():
    from transformers import PreTrainedModel

    import fastdecode

    generate_module = importlib.import_module("fastdecode.hf.generate")  # not the function

    post_init = PreTrainedModel.post_init

    def patched_post_init(self, *args, **kwargs):
        result = post_init(self, *args, **kwargs)
        fastdecode.patch(self)
        return result

    PreTrainedModel.post_init = patched_post_init
    generate = generate_module.generate

    def counted(model, *args, **kwargs):
        error = result = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = generate(model, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 (counted, then raised again)
                error = exc
        _classify(caught, error is not None)
        for w in caught:  # hand them on to the test
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if error is not None:
            raise error
        return result

    generate_module.generate = counted


def _classify(caught, raised: bool) -> None:
    """One call: fallback (with the reasons fastdecode named), raised, or native."""
    for w in caught:
        text = str(w.message)
        if text.startswith(_FALLBACK):
            reasons = text[len(_FALLBACK):].split("; ")
            attention = "output_attentions" in reasons
            _STATE["calls"]["fallback_attentions" if attention else "fallback"] += 1
            _STATE["reasons"].update(reasons)
            _STATE["fallbacks"][_STATE["test"]].update(reasons)
            return
    _STATE["calls"]["raised" if raised else "native"] += 1


# --- driver ---------------------------------------------------------------------------------------

def _run(checkout: Path, family: str, mode: str, plugins: list[str], out: Path) -> dict:
    test_file = checkout / "tests" / "models" / family / f"test_modeling_{family}.py"
    report = out / f"{family}-{mode}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parent), str(checkout), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider",
           "-p", "hf_generation_suite", f"--fastdecode-mode={mode}",
           f"--fastdecode-report={report}"]
    for plugin in plugins:
        cmd += ["-p", plugin]
    report.unlink(missing_ok=True)
    with open(out / f"{family}-{mode}.log", "w") as log:  # collection errors show up here
        subprocess.run(cmd, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=False)
    if not report.exists():
        raise RuntimeError(f"pytest wrote no report for {family} ({mode}): see {log.name}")
    return json.loads(report.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, required=True)
    parser.add_argument("--families", required=True, help="comma-separated model folder names")
    parser.add_argument("--plugins", default="", help="comma-separated extra pytest plugins")
    parser.add_argument("--out", type=Path, default=Path("hf_generation_suite.json"))
    args = parser.parse_args(argv)
    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    plugins = [p for p in args.plugins.split(",") if p]
    summary = {"transformers": transformers.__version__, "torch": torch.__version__,
               "command": " ".join(["python", "tools/hf_generation_suite.py",
                                    "--checkout <transformers checkout>",
                                    f"--families {args.families}", f"--out {args.out.name}",
                                    *([f"--plugins {args.plugins}"] if plugins else [])]),
               "families": {}, "regressions": [], "calls": collections.Counter(),
               "reasons": collections.Counter(), "passed": collections.Counter(),
               "fallbacks": {}}
    for family in args.families.split(","):
        runs = {mode: _run(args.checkout, family, mode, plugins, work) for mode in ("off", "patch")}
        passed = {m: {t for t, o in r["tests"].items() if o == "passed"} for m, r in runs.items()}
        if not runs["off"]["tests"]:
            raise RuntimeError(f"no test of {family} ran unpatched: see {work}/{family}-off.log")
        summary["families"][family] = {m: len(p) for m, p in passed.items()}
        summary["passed"].update({m: len(p) for m, p in passed.items()})
        summary["regressions"] += sorted(passed["off"] - passed["patch"])
        summary["calls"].update(runs["patch"]["calls"])
        summary["reasons"].update(runs["patch"]["reasons"])
        summary["fallbacks"].update(runs["patch"]["fallbacks"])
        print(f"{family:12} passing unpatched {len(passed['off']):4}  patched "
              f"{len(passed['patch']):4}  calls {dict(runs['patch']['calls'])}", flush=True)
    calls = summary["calls"]
    native = calls["native"]
    share = native / max(native + calls["fallback"], 1)
    share_all = native / max(native + calls["fallback"] + calls["raised"], 1)
    summary["native_share_without_attentions"] = share_all
    summary["native_share_without_attentions_or_errors"] = share
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"\ntests passing: unpatched {summary['passed']['off']}, patched "
          f"{summary['passed']['patch']}; passing unpatched but failing patched: "
          f"{len(summary['regressions'])}")
    for test in summary["regressions"]:
        print(f"  {test}")
    print(f"generate calls (patched run): native {native}, fallback {calls['fallback']} "
          f"(+{calls['fallback_attentions']} asking for attention weights), raised "
          f"{calls['raised']}; native share without attention weights {share_all:.1%} "
          f"({share:.1%} of the calls that do not raise)")
    print("fallback reasons:", ", ".join(f"{r} {n}" for r, n in summary["reasons"].most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
