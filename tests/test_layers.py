"""The package's rooms are layers: a module imports only from its own layer and the layers below it, and nothing in
`grpo_image` imports `rewards`, by statement or by a dotted string (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grpo_image"
LAYERS = {  # room -> layer; a module may import from rooms of its layer or lower
    "base": 0, "core": 1, "policies": 2, "decoders": 2, "scoring": 3, "training": 4, "planning": 4,
    "evaluation": 5, "export": 5, "app": 6,
}
TOP_LEVEL = {"__init__": 0, "_torchvision_compat": 0, "__main__": 6}  # modules outside the rooms


def room_layer(module: str) -> int:
    """The layer of a dotted module under grpo_image (`grpo_image.core.types` -> 1)."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    if parts[1] in TOP_LEVEL:
        return TOP_LEVEL[parts[1]]
    raise AssertionError(f"{module}: a module outside the rooms of docs/architecture.md")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, the ones inside functions included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))  # `from grpo_image.core import x`: the room is the module's
    return found


def dotted_reward_strings(source: str) -> list[tuple[int, str]]:
    """String constants that name a module of the rewards package (`"rewards.ocr.OCR"`; not `f"rewards.{i}"`)."""
    tree = ast.parse(source)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith("rewards.") and node.value.split(".")[1][:1].isalpha()]


def violations(package: Path) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        layer = room_layer(module)
        for line, imported in imports_of(path):
            where = f"{path.relative_to(package.parent)}:{line}"
            if imported == "rewards" or imported.startswith("rewards."):
                problems.append(f"{where}: imports {imported} (grpo_image never imports rewards)")
            elif imported.startswith("grpo_image.") and imported.split(".")[1] in {**LAYERS, **TOP_LEVEL}:
                if room_layer(imported) > layer:
                    problems.append(f"{where}: {module} (layer {layer}) imports {imported} (layer "
                                    f"{room_layer(imported)}), a higher layer")
        for line, text in dotted_reward_strings(path.read_text(encoding="utf-8")):
            problems.append(f"{path.relative_to(package.parent)}:{line}: names the reward module {text!r}")
    return problems


def test_no_module_imports_a_higher_layer_or_the_rewards_package():
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("planted, expected", [
    ("from grpo_image.training.train import train\n", "(layer 1) imports grpo_image.training.train (layer 4)"),
    ("def f():\n    from grpo_image.app import cli\n", "imports grpo_image.app (layer 6)"),
    ("import rewards.ocr\n", "imports rewards.ocr (grpo_image never imports rewards)"),
    ('READER = {"_component_": "rewards.ocr.OCR"}\n', "names the reward module 'rewards.ocr.OCR'"),
])
def test_the_check_fails_on_a_planted_upward_import_or_reward_name(tmp_path, planted, expected):
    package = tmp_path / "grpo_image"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "planted.py").write_text(planted)
    found = violations(package)
    assert len(found) == 1 and expected in found[0], found


def test_a_config_key_path_is_not_a_reward_module():
    assert dotted_reward_strings('where = f"rewards.{index}.weight"\nkey = "rewards.0.required"\n') == []
