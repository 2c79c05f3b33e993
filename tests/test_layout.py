"""The layout's promise: outside its own folder, a defense is named only where it is registered."""

import ast
from pathlib import Path

from vlm_safety_plugins.core import plugins

PACKAGE = Path(__file__).resolve().parents[1] / "vlm_safety_plugins"
# Where the built-in defenses are registered: the plugin list and the public API's re-exports.
REGISTRATION = {PACKAGE / "core" / "plugins.py", PACKAGE / "__init__.py"}


def builtin_defenses() -> list[str]:
    return sorted(
        item.name for item in plugins.registry().defenses.values() if item.distribution == "vlm-safety-plugins"
    )


def code_mentions(path: Path, names: list[str]) -> list[str]:
    """Imports of a defense's folder and string literals equal to a defense's name, docstrings aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if "defenses" in parts and parts.index("defenses") + 1 < len(parts):
                found.append(f"{path.name}:{node.lineno}: imports {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in names:
                found.append(f"{path.name}:{node.lineno}: the string {node.value!r}")
    return found


def test_no_code_outside_a_defense_folder_names_a_defense():
    names = builtin_defenses()
    assert {"adashield", "cmrm", "eta", "vlm_guard"} <= set(names)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in REGISTRATION or (PACKAGE / "defenses") in path.parents and path.parent != PACKAGE / "defenses":
            continue
        offenders += code_mentions(path, names)
    assert not offenders, "defense names outside their folders:\n" + "\n".join(offenders)


def test_a_defense_folder_does_not_reach_into_another_defense():
    names = builtin_defenses()
    for name in names:
        for path in (PACKAGE / "defenses" / name).rglob("*.py"):
            imports = code_mentions(path, [])  # no name strings: only imports of defense folders
            others = [other for other in names if other != name]
            assert not [line for line in imports if any(f"defenses.{other}" in line for other in others)], imports


def test_every_builtin_defense_has_its_folder_and_registers_from_it():
    registered = plugins.registry().defenses
    for name in builtin_defenses():
        folder = PACKAGE / "defenses" / name
        assert (folder / "__init__.py").is_file() and (folder / "defense.py").is_file(), name
        assert registered[name].cls.__module__ == f"vlm_safety_plugins.defenses.{name}.defense"
        assert f"vlm_safety_plugins.defenses.{name}" in plugins.BUILTIN_PLUGINS
