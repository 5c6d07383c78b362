"""``docs/API.md`` documents the whole public API: every name a public ``lpa_kernels`` package exports
(its ``__all__``, found by walking the package, so a new package or export is covered without editing
this test), every public member of ``Method`` and its LPA subclass, every ``LPAConfig`` field, and every
option of ``lpa-train`` and ``lpa-bench``. The README points there, not outside the repository."""

import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import lpa_kernels
from lpa_kernels.lpa import LPAConfig, build_method
from tests.lpa.models import NUM_CLASSES, mlp

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "API.md").read_text()


def _documented(name: str) -> bool:
    """``name`` appears as code: `` `name` ``, `` `name(...)` ``, `` `obj.name` `` or in a list of them."""
    return re.search(rf"`(?:[\w.]+\.)?{re.escape(name)}[`(\[ ,]", API) is not None


def _public_modules():
    yield lpa_kernels
    for info in pkgutil.walk_packages(lpa_kernels.__path__, "lpa_kernels."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


EXPORTS = sorted({(m.__name__, n) for m in _public_modules() for n in getattr(m, "__all__", ())})


def test_the_walk_finds_the_known_packages():
    packages = {module for module, _ in EXPORTS}
    assert {"lpa_kernels", "lpa_kernels.nn", "lpa_kernels.lpa"} <= packages


@pytest.mark.parametrize("module,name", EXPORTS, ids=[f"{m}.{n}" for m, n in EXPORTS])
def test_every_exported_name_is_documented(module, name):
    assert _documented(name), f"{module}.{name} is exported but docs/API.md does not describe it"


def _members(cls) -> set[str]:
    return {n for c in cls.__mro__ if c.__module__.startswith("lpa_kernels") for n in vars(c) if not n.startswith("_")}


def test_every_public_method_member_and_config_field_is_documented():
    method = build_method("lpa+lpl", mlp(), NUM_CLASSES, layer="3")
    names = _members(type(method)) - {"name"}
    names |= {f.name for f in dataclasses.fields(LPAConfig)} | _members(LPAConfig)
    missing = sorted(n for n in names if not _documented(n))
    assert not missing, f"docs/API.md does not describe {missing}"


@pytest.mark.parametrize("program", ["lpa_programs.train", "lpa_bench.cli"])
def test_every_program_option_is_documented(program):
    parser = importlib.import_module(program).build_parser()
    options = {s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"}
    # the option itself in backticks, alone or with its argument: `--lr` must not pass for `--lr-decay`
    missing = sorted(o for o in options if f"`{o}`" not in API and f"`{o} " not in API)
    assert not missing, f"{parser.prog} options missing from docs/API.md: {missing}"


def test_the_readme_points_at_the_api_reference_and_nothing_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/API.md" in readme
    assert "shared/" not in readme, "the README must not send readers to files outside the repository"
