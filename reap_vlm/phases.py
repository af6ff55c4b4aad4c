"""Wall time and GPU peak of each phase of a stage, for the progress lines, the closing summary and the
metadata (`scoring.phases`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from . import console


class Phases:
    """`with phases("scoring", tokens=n): ...` times one phase. On a CUDA device the phase's GPU peak is
    torch's max_memory_allocated over the phase (reset at its start), in GiB."""

    def __init__(self, device: str | torch.device | None = None, echo: bool = True):
        self.echo = echo  # print a line at the end of each phase
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.cuda = self.cuda and torch.cuda.is_available()
        self.records: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, tokens: int | None = None) -> Iterator[dict]:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        record: dict = {}
        started = time.perf_counter()
        yield record  # a phase that raises is neither recorded nor printed
        if self.cuda:
            torch.cuda.synchronize()
        record["seconds"] = round(time.perf_counter() - started, 3)
        if tokens is None:
            tokens = record.pop("tokens", None)
        if tokens:
            record["tokens"] = int(tokens)
            record["tokens_per_s"] = round(tokens / max(record["seconds"], 1e-9), 1)
        if self.cuda:
            record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self.records[name] = record
        if self.echo:
            console.info(f"{name}: {describe(record)}")

    def summary(self) -> dict[str, dict]:
        return dict(self.records)


def describe(record: dict) -> str:
    text = f"{record['seconds']:.1f} s"
    if record.get("tokens"):
        text += f", {record['tokens']:,} tokens, {record['tokens_per_s']:,.0f} tokens/s"
    if "gpu_peak_gib" in record:
        text += f", GPU peak {record['gpu_peak_gib']:.2f} GiB"
    return text


def print_summary(records: dict[str, dict]) -> None:
    from rich.table import Table

    table = Table(title="phases")
    for col in ("phase", "seconds", "tokens", "tokens/s", "GPU peak GiB"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name, r in records.items():
        table.add_row(
            name,
            f"{r['seconds']:.1f}",
            f"{r['tokens']:,}" if r.get("tokens") else "-",
            f"{r['tokens_per_s']:,.0f}" if r.get("tokens") else "-",
            f"{r['gpu_peak_gib']:.2f}" if "gpu_peak_gib" in r else "-",
        )
    table.add_row("total", f"{sum(r['seconds'] for r in records.values()):.1f}", "", "", "", style="bold")
    console.table(table)
