"""The save path's layering: one pipeline below the store, imports running downward only.

``_store`` drives ``_pipeline``, which uses ``_saving``, ``_commit`` and ``_manifest``. ``_distributed_save``
supplies the world of a process group, and ``distributed`` holds the public helpers. None of those imports the
store, and no module but ``_store`` touches a ``SnapshotStore``'s private attributes: what the others need of a
store is public (``_preemption`` cancels queued saves with ``cancel_queued``).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bucketsnap"

#: Modules below the store: they must not import it (at run time) and must not reach into a store.
BELOW_STORE = ("_pipeline", "_commit", "_saving", "_distributed_save", "distributed", "_manifest")
#: Modules that use a store but must go through its public methods.
STORE_USERS = ("_preemption", "_triggers", "_resume", "_snapshotter", "persistence", "dcp")
#: What each layer of the save path may import from bucketsnap (besides the format and storage layers).
MAY_NOT_IMPORT = {
    "_pipeline": {"_store", "_distributed_save", "distributed", "_preemption"},
    "_commit": {"_store", "_pipeline", "_distributed_save", "distributed", "_saving"},
    "_saving": {"_store", "_pipeline", "_commit", "_distributed_save", "distributed"},
    "_distributed_save": {"_store", "_preemption"},
    "distributed": {"_store", "_pipeline", "_commit", "_distributed_save", "_preemption"},
    "_manifest": {"_store", "_pipeline", "_commit", "_saving", "_distributed_save", "distributed"},
}


def _tree(module: str) -> ast.Module:
    return ast.parse((SRC / f"{module}.py").read_text())


def _runtime_imports(tree: ast.Module) -> set[str]:
    """The bucketsnap modules imported, leaving out ``if TYPE_CHECKING:`` blocks (annotations only)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                visit(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bucketsnap."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bucketsnap."))
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit([n for n in getattr(node, field, []) if isinstance(n, ast.stmt)])

    visit(tree.body)
    return found


def _store_privates() -> set[str]:
    """Every private attribute and method of SnapshotStore (``self._x`` and ``def _x``, dunders aside)."""
    (store,) = [n for n in _tree("_store").body if isinstance(n, ast.ClassDef) and n.name == "SnapshotStore"]
    names = {n.name for n in store.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_")}
    for node in ast.walk(store):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_store_privates_are_found() -> None:
    assert {"_write", "_log", "_pipeline", "_commits", "_background"} <= _store_privates()


def test_the_save_path_imports_downward_only() -> None:
    for module, forbidden in MAY_NOT_IMPORT.items():
        imported = _runtime_imports(_tree(module))
        assert not imported & forbidden, f"{module} imports {sorted(imported & forbidden)}"


def test_the_pipeline_needs_no_torch_distributed() -> None:
    for module in ("_pipeline", "_commit", "_saving"):
        tree = _tree(module)
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.startswith("torch.distributed")}, module


def test_no_module_but_the_store_reaches_into_a_store() -> None:
    privates = _store_privates()
    for module in (*BELOW_STORE, *STORE_USERS):
        touched = {
            node.attr
            for node in ast.walk(_tree(module))
            if isinstance(node, ast.Attribute) and node.attr in privates and not _on_self(node)
        }
        assert not touched, f"{module} uses SnapshotStore privates {sorted(touched)}"


def _on_self(node: ast.Attribute) -> bool:
    """``self._x``: the module's own attribute of the same name, not a store's."""
    return isinstance(node.value, ast.Name) and node.value.id == "self"


def test_the_save_modules_know_no_store_object() -> None:
    """The pipeline and the distributed save are handed a pipeline, never a SnapshotStore."""
    for module in ("_pipeline", "_commit", "_saving", "_distributed_save"):
        tree = _tree(module)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "SnapshotStore" not in names, module
