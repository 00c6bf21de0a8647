"""Analyses as plug-ins (schemas/analyses.md): a third-party analysis installed from a temporary
package with a real entry point runs through the CLI and the Python API, lands in a table that
SQL reads, and survives compact, verify, object storage and a crash like the built-in tables; one
that raises, returns rows off its schema or clashes by name is refused with its name, and nothing
of that batch is committed."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import attnstore
from attnstore.abc.analysis import ENTRY_POINT_GROUP, Analysis
from attnstore.errors import AnalysisError
from attnstore.verify import verify_store
from tests.helpers import ROOT, extract_command

PLUGIN = '''
"""A third-party analysis: per (document, layer, head), the mean attention on the first token."""

import pyarrow as pa
import torch


class FirstMass:
    name = "mystat"
    schema = pa.schema([
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("head", pa.int32(), nullable=False),
        pa.field("first_mass", pa.float64()),
    ])

    def begin(self, batch):
        self.batch = batch
        self.sums = {}

    def rows(self, layer, q0, probs):
        block = probs[:, :, :, 0].double().sum(dim=2).cpu()  # [B, H]
        self.sums[layer] = self.sums.get(layer, 0) + block

    def end(self):
        b = self.batch
        cols = {"doc_id": [], "layer": [], "head": [], "first_mass": []}
        for layer, sums in sorted(self.sums.items()):
            for i, doc_id in enumerate(b.doc_ids):
                for hi, head in enumerate(b.heads):
                    cols["doc_id"].append(doc_id)
                    cols["layer"].append(layer)
                    cols["head"].append(head)
                    cols["first_mass"].append(float(sums[i, hi]) / int(b.lengths[i]))
        return pa.table(cols, schema=self.schema)


class Boom(FirstMass):
    """Raises on the batch that holds doc_id 3."""

    name = "boom"

    def rows(self, layer, q0, probs):
        if 3 in self.batch.doc_ids:
            raise RuntimeError("no statistic for doc 3")
        super().rows(layer, q0, probs)


class Wrong(FirstMass):
    """Its end() table has a float32 column where the schema says float64."""

    name = "wrong"

    def end(self):
        table = super().end()
        return table.set_column(3, "first_mass", table["first_mass"].cast(pa.float32()))


class Clash(FirstMass):
    """Claims the built-in heads table."""

    name = "heads"
'''

ENTRY_POINTS = """[attnstore.analyses]
mystat = mystat:FirstMass
boom = mystat:Boom
wrong = mystat:Wrong
clash = mystat:Clash
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary 'installed' package: mystat.py plus its dist-info with a real entry point."""
    root = tmp_path_factory.mktemp("site")
    (root / "mystat.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "mystat-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mystat\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def installed(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(plugin_dir))
    importlib.invalidate_caches()
    return plugin_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    lines = [topics[k][:200].replace("\n", " ") for k in sorted(topics)[:6]]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


ARGS = {"batch_size": 2, "max_length": 32, "codec": "lossless", "progress": False}
CLI_ARGS = ("--batch-size", "2", "--max-length", "32", "--codec", "lossless")


def _env(plugin_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(plugin_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return env


def check_values(path: str | Path, **kwargs: object) -> int:
    """Every mystat row equals the statistic computed here from the stored (lossless) matrices."""
    store = attnstore.open(str(path), **kwargs)  # type: ignore[arg-type]
    rows = store.sql("SELECT * FROM mystat ORDER BY doc_id, layer, head").to_pylist()
    docs = store.sql("SELECT doc_id FROM docs WHERE skipped IS NULL ORDER BY doc_id").column(0)
    layers, heads = store.manifest["layers"], store.manifest["heads"]
    assert len(rows) == len(docs) * len(layers) * len(heads)
    for r in rows:
        m = store.matrix(r["doc_id"], r["layer"], r["head"]).astype(np.float64)
        assert r["first_mass"] == pytest.approx(m[:, 0].mean(), rel=1e-6, abs=1e-9)
    return len(rows)


def test_builtin_families_are_registered_under_the_group() -> None:
    """pyproject registers the built-ins under the group (what `entry_points` lists once
    installed), the same classes the code knows before a reinstall."""
    import tomllib

    from attnstore.analyses import BUILTIN, available, load

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"][ENTRY_POINT_GROUP] == BUILTIN
    assert set(BUILTIN) <= set(available())
    for name in ("patterns", "syntax", "probes"):
        analysis = load(name)
        assert isinstance(analysis, Analysis)


def test_third_party_analysis_through_cli_and_api(
    installed: Path, llama_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    assert "mystat" in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    # the CLI, in a subprocess that finds the package on its path
    out = tmp_path / "cli.attn"
    cmd = extract_command(out, llama_dir, corpus, *CLI_ARGS, "--analysis", "mystat")
    subprocess.run(cmd, check=True, env=_env(installed), capture_output=True)
    n = check_values(out)
    assert n > 0
    # the Python API, with an instance and by name
    from mystat import FirstMass  # type: ignore[import-not-found]

    api = tmp_path / "api.attn"
    attnstore.extract(str(api), model=str(llama_dir), corpus=str(corpus), analyses=[FirstMass()],
                      **ARGS)  # fmt: skip
    assert check_values(api) == n
    by_name = tmp_path / "name.attn"
    attnstore.extract(str(by_name), model=str(llama_dir), corpus=str(corpus),
                      analyses=["mystat"], **ARGS)  # fmt: skip
    assert check_values(by_name) == n
    # the same rows whichever way it ran
    q = "SELECT * FROM mystat ORDER BY doc_id, layer, head"
    assert attnstore.open(str(out)).sql(q) == attnstore.open(str(api)).sql(q)
    # registered in the store: the table reads in a process that does not have the package
    assert (api / "analyses" / "mystat.json").is_file()
    script = f"import attnstore; print(attnstore.open({str(api)!r}).sql('SELECT count(*) FROM mystat').column(0)[0])"
    got = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         text=True, env=dict(os.environ))  # fmt: skip
    assert int(got.stdout.strip()) == n
    # the built-in tables are those of a run without the analysis
    plain = tmp_path / "plain.attn"
    attnstore.extract(str(plain), model=str(llama_dir), corpus=str(corpus), **ARGS)
    for table in ("docs", "tokens", "heads"):
        sql = f"SELECT * FROM {table} ORDER BY ALL"
        if table == "docs":
            sql = 'SELECT * EXCLUDE (segment, "offset") FROM docs ORDER BY ALL'
        assert attnstore.open(str(api)).sql(sql) == attnstore.open(str(plain)).sql(sql)


def test_analyze_runs_an_analysis_over_stored_matrices(
    installed: Path, llama_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    """`attnstore analyze` adds a plug-in table to a store extracted without it (resumably)."""
    out = tmp_path / "later.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), **ARGS)
    cmd = [sys.executable, "-m", "attnstore", "analyze", str(out), "--analysis", "mystat",
           "--json", "--batch", "2"]  # fmt: skip
    first = subprocess.run(cmd, check=True, env=_env(installed), capture_output=True, text=True)
    assert '"commits": ' in first.stdout
    n = check_values(out)
    again = subprocess.run(cmd, check=True, env=_env(installed), capture_output=True, text=True)
    assert '"documents": 0' in again.stdout  # nothing left to do
    assert check_values(out) == n
    assert verify_store(str(out)).ok


def test_analysis_that_raises_is_refused_and_its_batch_not_committed(
    installed: Path, llama_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "boom.attn"
    with pytest.raises(AnalysisError, match=r"Analysis 'boom' raised in rows\(\): RuntimeError"):
        attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus),
                          analyses=["boom"], **ARGS)  # fmt: skip
    store = attnstore.open(str(out))
    assert 3 not in store.doc_ids()
    assert 3 not in store.sql("SELECT doc_id FROM boom").column(0).to_pylist()
    assert 3 not in store.sql("SELECT doc_id FROM heads").column(0).to_pylist()
    assert verify_store(str(out)).ok
    # the CLI says so in one line naming the analysis
    cmd = extract_command(tmp_path / "boom2.attn", llama_dir, corpus, *CLI_ARGS, "--analysis",
                          "boom")  # fmt: skip
    done = subprocess.run(cmd, check=False, env=_env(installed), capture_output=True, text=True)
    assert done.returncode != 0
    assert "Analysis 'boom' raised in rows()" in done.stderr
    assert "Traceback" not in done.stderr


def test_wrong_schema_is_refused(
    installed: Path, llama_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "wrong.attn"
    with pytest.raises(AnalysisError, match=r"Analysis 'wrong': table 'wrong' does not match"):
        attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus),
                          analyses=["wrong"], **ARGS)  # fmt: skip
    assert attnstore.open(str(out)).doc_ids() == set()  # the first batch failed: nothing


def test_name_clashes_are_refused(
    installed: Path, llama_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    from mystat import FirstMass

    out = tmp_path / "clash.attn"
    with pytest.raises(AnalysisError, match="'heads' clashes with the built-in table"):
        attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus),
                          analyses=["clash"], **ARGS)  # fmt: skip
    with pytest.raises(AnalysisError, match="'mystat' clashes with the analysis 'mystat'"):
        attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus),
                          analyses=["mystat", FirstMass()], **ARGS)  # fmt: skip
    with pytest.raises(AnalysisError, match="Unknown analysis 'nosuch'"):
        attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus),
                          analyses=["nosuch"], **ARGS)  # fmt: skip
    with pytest.raises(AnalysisError, match="not \\[a-z\\]"):
        attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus),
                          analyses=["Bad-Name"], **ARGS)  # fmt: skip
    assert not out.exists()  # refused before anything was written

    class Other(FirstMass):  # same table name, another schema, into a store that has mystat
        schema = FirstMass.schema.append(pa.field("x", pa.int64()))

    first = tmp_path / "first.attn"
    attnstore.extract(str(first), model=str(llama_dir), corpus=str(corpus), limit=2,
                      analyses=["mystat"], **ARGS)  # fmt: skip
    with pytest.raises(AnalysisError, match="table 'mystat' of this store has another schema"):
        attnstore.extract(str(first), model=str(llama_dir), corpus=str(corpus),
                          analyses=[Other()], **ARGS)  # fmt: skip


def test_plugin_table_survives_compact_verify_and_crash(
    installed: Path, llama_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    from attnstore.compact import compact

    out = tmp_path / "crash.attn"
    cmd = extract_command(out, llama_dir, corpus, *CLI_ARGS, "--analysis", "mystat")
    env = _env(installed, ATTNSTORE_COMMIT_EVERY="1", ATTNSTORE_CRASH_AT="commit:mystat:2")
    killed = subprocess.run(cmd, check=False, env=env, capture_output=True)
    assert killed.returncode == -9  # SIGKILL after mystat's 2nd commit, before its docs commit
    store = attnstore.open(str(out))
    visible = store.doc_ids()
    seen = set(store.sql("SELECT DISTINCT doc_id FROM mystat").column(0).to_pylist())
    assert seen <= visible  # the half flush is hidden
    subprocess.run(cmd, env=_env(installed), check=True, capture_output=True)
    n = check_values(out)
    report = verify_store(str(out))
    assert report.ok, report.problems
    summary = compact(str(out), retention_hours=0)
    assert "mystat" in summary["tables"]
    assert check_values(out) == n
    assert verify_store(str(out)).ok
    # the CLI's query verb sees it like a built-in table
    from click.testing import CliRunner

    from attnstore.cli import cli

    result = CliRunner().invoke(cli, ["query", str(out), "SELECT count(*) AS n FROM mystat",
                                      "--format", "csv"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert str(n) in result.output


def test_plugin_table_on_object_storage(
    installed: Path, s3: str, llama_dir: Path, corpus: Path
) -> None:
    from mystat import FirstMass

    from attnstore.compact import compact

    url = f"{s3}/runs/plugin.attn"
    attnstore.extract(url, model=str(llama_dir), corpus=str(corpus), analyses=[FirstMass()],
                      **ARGS)  # fmt: skip
    n = check_values(url)
    compact(url, retention_hours=0)
    assert check_values(url) == n
    report = verify_store(url)
    assert report.ok, report.problems

    # the post-hoc pass writes through the opened store's own storage
    from attnstore.analyses.posthoc import analyze
    from attnstore.store import Store

    class Later(FirstMass):
        name = "mystat_later"

    summary = analyze(Store(url), [Later()], batch=2)
    assert summary["commits"] >= 1
    store = attnstore.open(url)
    q = "SELECT * EXCLUDE (first_mass), first_mass FROM {} ORDER BY doc_id, layer, head"
    now, later = store.sql(q.format("mystat")), store.sql(q.format("mystat_later"))
    assert now.num_rows == later.num_rows == n
    assert later["first_mass"].to_pylist() == pytest.approx(now["first_mass"].to_pylist())


def test_registration_files_validate(
    installed: Path, llama_dir: Path, corpus: Path, tmp_path: Path
) -> None:
    import json

    import jsonschema

    schema = json.loads((ROOT / "schemas" / "analysis-table.schema.json").read_text())
    out = tmp_path / "reg.attn"
    attnstore.extract(str(out), model=str(llama_dir), corpus=str(corpus), limit=2,
                      analyses=["mystat"], **ARGS)  # fmt: skip
    doc = json.loads((out / "analyses" / "mystat.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["sorted_by"] == ["doc_id", "layer", "head"]
    assert [c["name"] for c in doc["columns"]] == ["doc_id", "layer", "head", "first_mass"]
    # a damaged registration is a finding of verify, not a crash
    (out / "analyses" / "mystat.json").write_text("{not json")
    report = verify_store(str(out))
    assert not report.ok
    assert any(p.location == "analyses" for p in report.problems), report.problems


class Recorder:
    """Records what the protocol delivers (blocks, shapes, zeros) and checks it in end()."""

    name = "recorder"
    schema = pa.schema([pa.field("doc_id", pa.int64(), nullable=False),
                        pa.field("layer", pa.int32()), pa.field("blocks", pa.int32())])  # fmt: skip

    def __init__(self) -> None:
        self.batches: list[dict[str, object]] = []

    def begin(self, batch: object) -> None:
        self.batch = batch
        self.seen: dict[int, list[tuple[int, int]]] = {}

    def rows(self, layer: int, q0: int, probs: object) -> None:
        import torch

        assert isinstance(probs, torch.Tensor)
        b = self.batch
        n, h, q, k = probs.shape
        assert probs.dtype == torch.float32
        assert (n, h) == (len(b.doc_ids), len(b.heads))  # type: ignore[attr-defined]
        assert k >= q0 + q
        self.seen.setdefault(layer, []).append((q0, q))
        lengths = b.lengths.tolist()  # type: ignore[attr-defined]
        for i, length in enumerate(lengths):
            for r in range(q):
                row = probs[i, :, r]
                if q0 + r >= length:
                    assert not row.any()  # past the document's end
                    continue
                assert not row[:, q0 + r + 1 :].any()  # above the diagonal
                torch.testing.assert_close(row.sum(-1), torch.ones(h), atol=1e-4, rtol=0)

    def end(self) -> pa.Table:
        t = int(self.batch.token_ids.shape[1])  # type: ignore[attr-defined]
        layers = list(self.batch.layers)  # type: ignore[attr-defined]
        assert sorted(self.seen) == layers
        rows = []
        for layer, blocks in self.seen.items():
            starts = [q0 for q0, _ in blocks]
            assert starts == sorted(starts)
            covered = [q0 + r for q0, q in blocks for r in range(q)]
            assert covered == list(range(t))  # every row exactly once, in order
            rows += [
                {"doc_id": doc_id, "layer": layer, "blocks": len(blocks)}
                for doc_id in self.batch.doc_ids  # type: ignore[attr-defined]
            ]
        self.batches.append({"blocks": max(len(b) for b in self.seen.values())})
        return pa.Table.from_pylist(rows, schema=self.schema)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 28])
def test_blocks_follow_the_protocol(llama_dir: Path, corpus: Path, chunk_bytes: int) -> None:
    """Exact rows in blocks of increasing q0 covering every row once; zeros past a document's end
    and above the diagonal; one block per layer or one row per block."""
    from attnstore.capture import Extractor, load_model
    from attnstore.codecs import get_codec
    from attnstore.corpus import read_corpus

    loaded = load_model(str(llama_dir), progress=False)
    recorder = Recorder()
    ex = Extractor(loaded, get_codec("lossless"), 24, layers=[0, 2], heads=[1, 3],
                   chunk_bytes=chunk_bytes, analyses=[recorder])  # fmt: skip
    batch = [ex.tokenize(d) for d in read_corpus(str(corpus))][:3]
    del batch[1].ids[5:]  # documents of different lengths: padded rows and keys
    segment = ex.run(batch)
    table = segment.extra["recorder"]
    assert set(table["layer"].to_pylist()) == {0, 2}
    blocks = recorder.batches[-1]["blocks"]
    assert blocks == (24 if chunk_bytes == 1 else 1)
