"""The import layers of the package (README, *Development*): every module imports only from
layers below its own, so there is no cycle and nothing low depends on anything high."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "ats_vit"

# lowest first; the package's __init__ (the public re-exports) sits on top of everything
LAYERS = [
    {"_validate", "_progress", "_io", "stats", "timing", "distributed", "glyphs"},
    {"options"},
    {"sampling"},
    {"flops"},
    {"tokens"},
    {"attention"},
    {"vit"},
    {"families.base"},
    {"families._patched", "families.vit"},
    {"families.timm_eva", "families.timm_beit"},
    {"families.timm", "families.hf"},
    {"families", "families.hf_timesformer"},
    {"timm", "hf", "testing", "deploy"},
    {"budget", "latency"},
    {"calibrate.methods", "data", "models"},
    {"calibrate.search"},
    {"calibrate.choice", "calibrate.verify"},
    {"calibrate"},
    {"video"},
    {"checkpoint"},
    {"evaluate", "viz", "sources"},
    {"train"},
    {"bench.common", "bench._timer"},
    {"bench.speed", "bench.frontier", "bench.train"},
    {"bench"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The ats_vit modules ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ats_vit"):
            base = node.module.removeprefix("ats_vit").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}".lstrip(".")
                is_module = (PACKAGE / (sub.replace(".", "/") + ".py")).exists() or (PACKAGE / sub).is_dir()
                found.add(sub if is_module else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("ats_vit.") for a in node.names if a.name.startswith("ats_vit.")}
    return found - {""}


def test_every_module_has_a_layer():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {""}
    placed = set().union(*LAYERS)
    assert modules == placed, f"not placed: {sorted(modules - placed)}; gone: {sorted(placed - modules)}"


def test_modules_import_only_from_lower_layers():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    upward = [
        f"{module_name(p)} (layer {layer[module_name(p)]}) imports {dep} (layer {layer[dep]})"
        for p in PACKAGE.rglob("*.py")
        if module_name(p)
        for dep in imports(p)
        if layer[dep] >= layer[module_name(p)]
    ]
    assert not upward, "\n".join(upward)
