"""Conda environments, checked without conda (conda cannot be installed on the test machines):
every rule names an existing env file; each env lists every third-party package that the rule's
`python -m pipeline <stage>` imports (followed recursively through the `pipeline` modules, lazy
imports included); versions agree with pyproject.toml; and the rules import the `pipeline` package
from the workflow's folder whatever the working directory (envs/README.md)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "workflow" / "rules"

# import name -> distribution name, where they differ
DISTRIBUTIONS = {
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "yaml": "pyyaml",
    "pydensecrf": "pydensecrf2",
    "faiss": "faiss-cpu",
}


# ---------------------------------------------------------------------------------------------
# The rules


def rule_blocks() -> dict[str, str]:
    """{rule name: text of its block} over workflow/rules/*.smk, for the rules that run something
    (the stage targets of targets.smk only gather inputs: no shell, no environment)."""
    blocks = {}
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        starts = [(m.start(), m.group(2)) for m in re.finditer(r"^(rule|checkpoint)\s+(\w+)\s*:", text, re.M)]
        for (start, name), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
            if "    shell:" in text[start:end]:
                blocks[name] = text[start:end]
    return blocks


def shell_text(block: str) -> str:
    """The concatenated string literals of a rule's shell: directive."""
    shell = block.split("    shell:", 1)[1]
    return "".join(ast.literal_eval(s) for s in re.findall(r'^\s*("(?:[^"\\]|\\.)*")', shell, re.M))


def rule_stage(block: str) -> str:
    """The stage a rule's shell runs: `python -m pipeline STAGE` or, through the GPU launcher,
    `python -m pipeline.devices launch --gpus N -- STAGE`."""
    shell = shell_text(block)
    match = re.search(r"python -m pipeline\.devices launch --gpus \{resources\.gpu\} -- ([\w-]+)", shell) or re.search(
        r"python -m pipeline ([\w-]+)", shell
    )
    assert match, f"no `python -m pipeline <stage>` in: {shell}"
    return match.group(1)


def rule_env(block: str) -> Path:
    match = re.search(r'^    conda:\n\s+"([^"]+)"', block, re.M)
    assert match, "no conda: directive"
    return (RULES / match.group(1)).resolve()


def test_the_regex_sees_every_rule_snakemake_sees(repo):
    listed = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--list-rules"],
                            cwd=repo, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    names = {line.strip() for line in listed.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)}
    # the target rules (inputs only, no job of their own): the Snakefile's and the stage targets
    targets = set(re.findall(r"^rule (\w+):", (RULES / "targets.smk").read_text(), re.M))
    assert targets >= {"features", "crf", "evaluate"}
    assert set(rule_blocks()) | targets | {"all", "apply"} == names


# ---------------------------------------------------------------------------------------------
# What a stage imports


def stage_entry_modules() -> dict[str, set[str]]:
    """{stage: pipeline modules its cli handler imports}, read from pipeline/cli.py."""
    tree = ast.parse((REPO / "pipeline" / "cli.py").read_text())
    handlers = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_cmd_"):
            handlers[node.name] = {n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.module}
    # what `python -m pipeline` imports before any stage (the stages' own imports are lazy)
    cli_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module.startswith("pipeline")}
    stages, current = {}, None
    build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_parser")
    for node in ast.walk(build):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "add_parser" and node.args and isinstance(node.args[0], ast.Constant):
                current = node.args[0].value
            elif node.func.attr == "set_defaults" and current is not None:
                func = next(k.value.id for k in node.keywords if k.arg == "func")
                stages[current] = handlers[func] | cli_level
    return stages


def module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def direct_imports(name: str) -> set[str]:
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def third_party_imports(modules: set[str]) -> set[str]:
    """Top-level third-party import names reachable from ``modules`` through pipeline modules."""
    seen, third, todo = set(), set(), list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in direct_imports(name):
            top = imported.split(".")[0]
            if top == "pipeline":
                parts = imported.split(".")
                todo.extend(".".join(parts[:k]) for k in range(1, len(parts) + 1) if module_path(".".join(parts[:k])))
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return third


def distribution(import_name: str) -> str:
    return canonicalize_name(DISTRIBUTIONS.get(import_name, import_name))


# ---------------------------------------------------------------------------------------------
# The env files and pyproject.toml


def env_requirements(path: Path) -> tuple[dict[str, SpecifierSet], list[str]]:
    """({distribution: specifier} of the pip section, conda dependencies)."""
    env = yaml.safe_load(path.read_text())
    pip, conda = {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                assert not line.startswith(("-e", "."))  and "/" not in line, f"{path.name}: {line} (a path breaks)"
                req = Requirement(line)
                pip[canonicalize_name(req.name)] = req.specifier
        else:
            conda.append(dep)
    return pip, conda


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pyproject_requirements() -> dict[str, SpecifierSet]:
    return {canonicalize_name(Requirement(d).name): Requirement(d).specifier for d in pyproject()["dependencies"]}


ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def test_every_rule_names_an_existing_env_file():
    blocks = rule_blocks()
    assert len(blocks) >= 15
    for name, block in blocks.items():
        assert rule_env(block).is_file(), f"rule {name}: {rule_env(block)} does not exist"
    used = {rule_env(b) for b in blocks.values()}
    assert used == set(ENV_FILES), f"env files no rule uses: {set(ENV_FILES) - used}"


@pytest.mark.parametrize("rule", sorted(rule_blocks()))
def test_env_lists_what_the_rule_imports(rule):
    block = rule_blocks()[rule]
    stage = rule_stage(block)
    stages = stage_entry_modules()
    assert stage in stages, f"rule {rule}: stage {stage!r} is not a sub-command of python -m pipeline"
    modules = set(stages[stage])
    if "pipeline.devices launch" in shell_text(block):
        modules.add("pipeline.devices")
    needed = {distribution(name) for name in third_party_imports(modules)}
    if "torch.distributed.run" in (REPO / "pipeline" / "devices.py").read_text() and "pipeline.devices" in modules:
        needed.add("torch")
    listed, _ = env_requirements(rule_env(block))
    missing = sorted(needed - set(listed))
    assert not missing, f"rule {rule} (stage {stage}) imports {missing}, absent from {rule_env(block).name}"


def test_the_report_env_has_no_torch():
    """The report and evaluation only read masks and tables: a light env, without torch."""
    listed, _ = env_requirements(REPO / "envs" / "report.yaml")
    assert "torch" not in listed
    for stage in ("report", "evaluate"):
        assert "torch" not in third_party_imports(stage_entry_modules()[stage])


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_versions_agree_with_pyproject(env_file):
    declared = pyproject_requirements()
    listed, conda = env_requirements(env_file)
    for name, spec in listed.items():
        assert name in declared, f"{env_file.name}: {name} is not a dependency in pyproject.toml"
        assert spec == declared[name], f"{env_file.name}: {name}{spec} but pyproject.toml says {name}{declared[name]}"
    python = next(d for d in conda if str(d).startswith("python"))
    version = re.split(r"[=<>]+", python, maxsplit=1)[1]
    assert SpecifierSet(pyproject()["requires-python"]).contains(version + ".0" if version.count(".") == 1 else version)
    assert "pip" in conda


def test_pyproject_declares_every_package_the_code_imports():
    every = {distribution(n) for n in third_party_imports({str(p.relative_to(REPO).with_suffix("")).replace("/", ".")
                                                          for p in (REPO / "pipeline").rglob("*.py")})}
    missing = every - set(pyproject_requirements())
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# The package comes from the workflow folder


def test_rules_import_the_package_from_the_workflow_folder(tmp_path):
    """A copy of the workflow whose `python -m pipeline` says where it was imported from, run from
    another working directory: the job must use the copy's package, not the installed one (the
    shell prefix of common.smk puts the workflow folder first on PYTHONPATH; conda jobs too)."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in ("Snakefile", "config.yaml", "workflow", "pipeline", "envs"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / item, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    main = copy / "pipeline" / "__main__.py"
    main.write_text("import sys\nimport pipeline\nprint('PIPELINE FROM', pipeline.__file__, file=sys.stderr)\n"
                    + main.read_text())
    work = tmp_path / "work"
    work.mkdir()
    results = work / "results"
    configfile = work / "tiny.yaml"
    configfile.write_text(yaml.safe_dump({"results": str(results), "dataset": {"demo": {
        "n_train": 2, "n_val": 1, "width": 32, "height": 32}}}))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(copy / "Snakefile"), "--cores", "1",
         "--configfile", str(configfile), "--", str(results / "data" / "demo")],
        cwd=work, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = (results / "logs" / "demo_data.log").read_text()
    assert f"PIPELINE FROM {copy / 'pipeline' / '__init__.py'}" in log, log
