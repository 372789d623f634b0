"""kinema.media when things go wrong: damaged inputs, killed writers, full or unwritable disks, bad options."""

import ast
from pathlib import Path

import kinema.media

MEDIA = Path(kinema.media.__file__).parent


def _media_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(kinema.media module imported, whether the import is inside a function) for every import."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("kinema.media."):
                found.append((child.module.rsplit(".", 1)[1], inner))
            elif isinstance(child, ast.ImportFrom) and child.module == "kinema.media":
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.Import):
                found.extend((a.name.rsplit(".", 1)[1], inner) for a in child.names if a.name.startswith("kinema.media."))
            visit(child, inner)

    visit(tree, False)
    return found


def test_media_modules_import_one_way():
    """No module of kinema.media reaches itself through its imports, and none hides an import
    of a sibling inside a function (the usual way to dodge a cycle)."""
    modules = {p.stem for p in MEDIA.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        imports = _media_imports(ast.parse((MEDIA / f"{name}.py").read_text()))
        hidden = [m for m, in_function in imports if in_function and m in modules]
        assert not hidden, f"kinema/media/{name}.py imports {hidden} inside a function"
        graph[name] = {m for m, _ in imports if m in modules}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, (*seen, m))) for m in graph[start])

    cyclic = sorted(m for m in modules if reaches(m, m))
    assert not cyclic, f"import cycle through {cyclic}: {graph}"


def test_public_names_still_import():
    from kinema.media import __all__ as names
    from kinema.media.read import IMAGE_SUFFIXES, check_readable, open_container, open_image  # used by kinema.train

    assert {"read_metadata", "save_video", "read_video"} <= set(names)
    assert all(hasattr(kinema.media, n) for n in names)
    assert callable(check_readable) and callable(open_container) and callable(open_image) and ".png" in IMAGE_SUFFIXES
