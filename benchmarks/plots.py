"""Plots of the benchmarks (matplotlib, PNG files next to the results)."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.cli import said_written


def training_curves(report: dict, path: pathlib.Path) -> None:
    """Test accuracy and forward iterations per epoch, one line per kind."""
    fig, (acc, its) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, history in report["runs"].items():
        epochs = [row["epoch"] for row in history]
        acc.plot(epochs, [100 * row["test_accuracy"] for row in history], marker="o", label=kind)
        its.plot(epochs, [row["train_forward_iterations"] for row in history], marker="o", label=kind)
    acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{report['model']} on {report['dataset']}")
    its.set(xlabel="epoch", ylabel="mean forward iterations", title="solver iterations (training)")
    _save(fig, [acc, its], path)


def residual_traces(traces: dict, path: pathlib.Path, title: str, tol: float) -> None:
    """Mean relative residual against the iteration (``kind -> (iterations, residuals)``), one
    line per kind (log scale), and the tolerance ``tol``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, (steps, values) in traces.items():
        ax.semilogy(steps, values, marker=".", label=kind)
    ax.axhline(tol, color="gray", linestyle="--", linewidth=1, label="tolerance")
    ax.set(xlabel="iteration", ylabel="mean relative residual", title=title)
    _save(fig, [ax], path)


def enclosure_gap(bounds: list[float], residuals: list[float], path: pathlib.Path, title: str) -> None:
    """The certified bound on max|z - z*| and the residual of the plain solve, per iteration."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(range(1, len(bounds) + 1), bounds, marker=".", label="certified bound on max|z - z*|")
    ax.semilogy(range(1, len(residuals) + 1), residuals, marker=".", label="relative residual (plain solve)")
    ax.set(xlabel="iteration", ylabel="mean over the batch", title=title)
    _save(fig, [ax], path)


def _save(fig, axes, path: pathlib.Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    said_written(path)
