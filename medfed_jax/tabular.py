"""Files and tables the host writes: atomic writes, CSV text and files, markdown tables. The one place for each.

- Atomic writes (`write_atomic`, `write_text_atomic`): a temporary
  ``<path>.tmp<pid>`` (`TEMPORARY`), fsynced, then renamed, so a crash leaves
  either the old or the new file; in a run of many processes only process 0
  writes (`medfed_jax.mesh.is_writer`).
- CSV (`to_csv`, `write_csv`, `append_csv`, `read_csv`): dict rows, columns
  the union of the rows' keys in first-seen order, ``\\n`` line ends, missing
  entries empty; read back as dicts of strings. Per-client values are written
  long (one row per client and metric, `medfed_jax.sweep.tables`);
  `join_wide` spreads them back beside their rows for a reader that wants
  one column per client.
- Markdown (`markdown_table`): a header and string cells, columns padded to
  their widest cell (or compact).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

TEMPORARY = re.compile(r"^(?P<target>.+)\.tmp(?P<pid>[0-9]+)$")  # `write_atomic`'s file before its rename


def write_atomic(path: str, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(f)`` on a temporary file, fsync it, rename it to ``path``; remove it if anything fails.

    A kill between the write and the rename leaves ``<path>.tmp<pid>``
    (`TEMPORARY`); the next run removes it (`medfed_jax.cli.prepare_workdir`).
    """
    from medfed_jax import mesh  # here: JAX loads only when something is written

    if not mesh.is_writer():  # many processes: process 0 writes, the others hold the same values
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file so that a crash leaves either the old or the new file (`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text))


def columns_of(rows: Sequence[dict]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    return list(dict.fromkeys(k for row in rows for k in row))


def to_csv(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """CSV text of dict rows; columns ``columns`` or else `columns_of` the rows, missing entries empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, columns_of(rows) if columns is None else columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """`to_csv` written atomically to ``path``."""
    write_text_atomic(path, to_csv(rows, columns))


def append_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """Append dict rows (no header) to a CSV file whose header is ``columns``; missing entries empty."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, columns, restval="", lineterminator="\n").writerows(rows)


def read_csv(path: str) -> list[dict]:
    """The rows of a CSV file with a header, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_csv_if_present(path: str) -> list[dict]:
    """`read_csv`, or no rows when the file does not exist."""
    return read_csv(path) if os.path.exists(path) else []


def join_wide(rows: Sequence[dict], long_rows: Sequence[dict], stats: dict[str, str]) -> list[dict]:
    """``rows``, each with its long-format rows (``client``, ``metric``, values) spread into
    ``<metric>[<client>]<suffix>`` entries.

    A long row belongs to a row when they agree on every column the long rows
    have besides ``client``, ``metric``, ``n`` and ``stats``' keys; ``stats``
    maps a long row's value column to its suffix: ``{"value": ""}`` for
    ``clients.csv``, ``{"mean": "_mean", "std": "_std", "ci95": "_ci95"}`` for
    ``clients_summary.csv``.
    """
    if not long_rows:
        return list(rows)
    keys = [k for k in long_rows[0] if k not in {"client", "metric", "n", *stats}]
    wide: dict[tuple, dict] = {}
    for r in long_rows:
        entry = wide.setdefault(tuple(r[k] for k in keys), {})
        entry.update({f"{r['metric']}[{r['client']}]{suffix}": r[column] for column, suffix in stats.items()})
    return [{**row, **wide.get(tuple(row[k] for k in keys), {})} for row in rows]


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], padded: bool = True) -> str:
    """A markdown table: columns padded to their widest cell, or ``padded=False`` cells as they are."""
    if not padded:
        line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
        return "\n".join([line(header), "|" + "---|" * len(header), *map(line, body)])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
