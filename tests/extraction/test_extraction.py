"""One extraction run for every driver: its settings one frozen, checked object; the drivers
(extract, the Ray actor, materialize) share it through public names only; the store is opened once
and that opened storage is what readers and writers take."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import attnstore
from attnstore.errors import AttnStoreError
from attnstore.extraction import ExtractConfig

PACKAGE = Path(attnstore.__file__).parent


def test_config_is_frozen_and_checked() -> None:
    config = ExtractConfig.of(layers=[1, 0], heads=range(2), shard="1/4", analyses=["x"])
    assert config.layers == (1, 0)
    assert config.heads == (0, 1)
    assert config.shard == (1, 4)
    assert config.analyses == ("x",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 2  # type: ignore[misc]
    with pytest.raises(AttnStoreError, match="--batch-size must be ≥ 1"):
        ExtractConfig(batch_size=0)
    with pytest.raises(AttnStoreError, match="--limit must be ≥ 0"):
        ExtractConfig(limit=-1)
    with pytest.raises(AttnStoreError, match="0 ≤ index < count"):
        ExtractConfig.of(shard="4/4")


@pytest.mark.parametrize("module", ["pipeline", "cluster", "materialize", "annotate"])
def test_drivers_import_no_private_names(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnstore")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_readers_and_writers_take_an_opened_storage(llama_store: Path, tmp_path: Path) -> None:
    from attnstore.compact import compact
    from attnstore.storage import open_storage
    from attnstore.store import Store, StoreWriter

    storage = open_storage(llama_store)
    store = Store(storage)
    assert store.path == Path(llama_store)
    assert store.doc_ids() == attnstore.open(str(llama_store)).doc_ids()
    target = open_storage(tmp_path / "copy.attn")
    writer = StoreWriter(target, store.manifest)
    writer.close()
    assert Store(target).doc_ids() == set()
    assert compact(target)["tables"] == {}


def _import_graph() -> dict[str, set[str]]:
    """Module → the attnstore modules it imports (function-level imports included)."""
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
            ".__init__"
        )
        mods[name] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnstore"):
                assert node.module is not None
                subs = [f"{node.module}.{a.name}" for a in node.names]
                subs = [s for s in subs if s in mods]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("attnstore")]
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def test_new_subpackages_are_in_no_import_cycle() -> None:
    graph = _import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    for m in graph:
        if m.startswith(("attnstore.analyses", "attnstore.extraction", "attnstore.abc")):
            assert not reaches(m, m), m


def test_skip_analysis_drops_a_default_and_refuses_the_rest(
    tmp_path: Path, llama_dir: Path, corpus_txt: Path
) -> None:
    kw = {"model": str(llama_dir), "corpus": str(corpus_txt), "max_length": 16, "limit": 3,
          "scores_only": True, "progress": False}  # fmt: skip
    with_sparsity, without = tmp_path / "a.attn", tmp_path / "b.attn"
    attnstore.extract(str(with_sparsity), **kw)  # type: ignore[arg-type]
    attnstore.extract(str(without), skip_analyses=["sparsity"], **kw)  # type: ignore[arg-type]
    count = "SELECT count(*) FROM sparsity"
    assert attnstore.open(str(with_sparsity)).sql(count).column(0)[0].as_py() > 0
    assert attnstore.open(str(without)).sql(count).column(0)[0].as_py() == 0
    q = "SELECT * FROM heads ORDER BY doc_id, layer, head"
    assert attnstore.open(str(with_sparsity)).sql(q) == attnstore.open(str(without)).sql(q)
    for bad in ("patterns", "nonesuch"):
        with pytest.raises(AttnStoreError, match="--skip-analysis takes a default analysis"):
            attnstore.extract(str(tmp_path / "c.attn"), skip_analyses=[bad], **kw)  # type: ignore[arg-type]


#: A value other than the default for every ExtractConfig field: a new field fails the tests below
#: until it is listed here (and so until every driver is checked to carry it).
NON_DEFAULT: dict[str, object] = {
    "corpus": "c.txt", "text_field": "body", "max_length": 32, "batch_size": 2, "device": "cpu",
    "dtype": "float32", "codec": "lossless", "limit": 5, "layers": (1,), "heads": (0, 2),
    "allow_different": True, "shard": (1, 2), "parse": "en_core_web_sm", "scores_only": True,
    "attention": "eager", "values": "logits", "rows": "0:4,-8:", "overview": 16,
    "analyses": ("x",), "skip_analyses": ("sparsity",), "settings": {"from": "here"},
}  # fmt: skip


def test_every_setting_has_a_test_value() -> None:
    fields = {f.name: f for f in dataclasses.fields(ExtractConfig)}
    assert set(NON_DEFAULT) == set(fields)
    default = ExtractConfig()
    assert all(getattr(default, k) != v for k, v in NON_DEFAULT.items())


def _keywords(module: str, callee: str) -> set[str]:
    """The keyword arguments of the calls to ``callee`` (a name or ``obj.attr``) in a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == callee:
            out.update(k.arg for k in node.keywords if k.arg is not None)
    return out


def test_extract_and_the_cli_pass_every_setting() -> None:
    """attnstore.extract takes and passes each field, the CLI gives each one (``settings`` is
    internal)."""
    import inspect

    from attnstore.pipeline import extract

    wanted = set(NON_DEFAULT) - {"settings"}
    assert wanted <= set(inspect.signature(extract).parameters)
    assert wanted <= _keywords("pipeline", "ExtractConfig.of")
    assert wanted <= _keywords("cli", "run_extract")


def test_every_setting_reaches_the_ray_actors() -> None:
    """extract_ray builds the actors' one config from its keyword arguments: nothing is dropped,
    and what Ray decides itself is refused rather than ignored."""
    from attnstore.cluster import RAY_DECIDES, ray_config

    for name, value in NON_DEFAULT.items():
        if name in RAY_DECIDES:
            with pytest.raises(AttnStoreError, match=f"extract_ray sets {name} itself"):
                ray_config("c.txt", {name: value})
        else:
            assert getattr(ray_config("c.txt", {name: value}), name) == value, name
    everything = {k: v for k, v in NON_DEFAULT.items() if k not in RAY_DECIDES}
    config = ray_config("c.txt", everything)
    assert config == dataclasses.replace(ExtractConfig(**everything), corpus="c.txt")
    with pytest.raises(AttnStoreError, match=r"no setting overveiw\. Settings: .*overview"):
        ray_config("c.txt", {"overveiw": 16})
    with pytest.raises(AttnStoreError, match="--rows"):
        ray_config("c.txt", {"rows": "a:b"})
