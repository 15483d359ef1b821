"""The continual-learning accuracy matrix: a[j][i] after training task j on task i; OP, BWT, FWT
and plasticity (GEM's definitions); JSON and markdown; an annotated heatmap PNG.

  AccuracyMatrix                                 # a[j][i]; OP / BWT / FWT; JSON + markdown
  plot_heatmap(matrix, path, title)              # PNG, written atomically
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

from .atomic import atomic_write_bytes
from .errors import EdgekifError


def _is_missing(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


class AccuracyMatrix:
    """a[j][i] = accuracy (fraction in [0, 1]) on task i after training on task j; None = not evaluated.

    Metrics follow GEM (Lopez-Paz & Ranzato, 2017). With T tasks:
      OP  = mean_i a[T-1][i]                              (average accuracy at the end)
      BWT = mean_{i<T-1} (a[T-1][i] - a[i][i])            (negative = forgetting)
      FWT = mean_{i>=1} (a[i-1][i] - zero_shot[i])        (zero_shot = base model, before any training)
      plasticity = mean_i a[i][i]                         (each task just after learning it: a method
                                                           that "forgets less" by learning less shows here)
    A metric is None when a cell it needs is missing: a partial mean would quietly mean
    something else.
    """

    def __init__(self, tasks: Sequence[str] = ()):
        self.tasks: list[str] = []
        self.a: list[list[float | None]] = []
        for name in tasks:
            self.add_task(name)

    def __len__(self) -> int:
        return len(self.tasks)

    def add_task(self, name: str) -> int:
        """Append a task (a new row and column of missing cells); returns its index."""
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already in the matrix")
        self.tasks.append(name)
        for row in self.a:
            row.append(None)
        self.a.append([None] * len(self.tasks))
        return len(self.tasks) - 1

    def index(self, task: int | str) -> int:
        return self.tasks.index(task) if isinstance(task, str) else task

    def set(self, j: int | str, i: int | str, acc: float | None) -> None:
        """Record accuracy on task i after training task j (indices or task names)."""
        j, i = self.index(j), self.index(i)
        if _is_missing(acc):
            self.a[j][i] = None
            return
        acc = float(acc)
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy must be a fraction in [0, 1], got {acc} for a[{j}][{i}]")
        self.a[j][i] = acc

    def get(self, j: int | str, i: int | str) -> float | None:
        return self.a[self.index(j)][self.index(i)]

    def op(self) -> float | None:
        if not self.tasks:
            return None
        final = self.a[-1]
        if any(_is_missing(v) for v in final):
            return None
        return sum(final) / len(final)

    def bwt(self) -> float | None:
        T = len(self.tasks)
        if T < 2:
            return None
        diffs = [(self.a[T - 1][i], self.a[i][i]) for i in range(T - 1)]
        if any(_is_missing(x) or _is_missing(y) for x, y in diffs):
            return None
        return sum(x - y for x, y in diffs) / (T - 1)

    def fwt(self, zero_shot: Sequence[float | None]) -> float | None:
        """zero_shot[i]: accuracy of the untrained base on task i (zero_shot[0] is unused)."""
        T = len(self.tasks)
        if T < 2:
            return None
        if len(zero_shot) != T:
            raise ValueError(f"zero_shot has {len(zero_shot)} entries for {T} tasks")
        pairs = [(self.a[i - 1][i], zero_shot[i]) for i in range(1, T)]
        if any(_is_missing(x) or _is_missing(y) for x, y in pairs):
            return None
        return sum(x - y for x, y in pairs) / (T - 1)

    def plasticity(self) -> float | None:
        diag = [self.a[i][i] for i in range(len(self.tasks))]
        if not diag or any(_is_missing(v) for v in diag):
            return None
        return sum(diag) / len(diag)

    def summary(self, zero_shot: Sequence[float | None] | None = None) -> dict[str, float | None]:
        return {"op": self.op(), "bwt": self.bwt(), "fwt": self.fwt(zero_shot) if zero_shot is not None else None}

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "a": [list(row) for row in self.a]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AccuracyMatrix":
        try:
            tasks = [str(t) for t in d["tasks"]]
            rows = d["a"]
            if len(rows) != len(tasks) or any(len(row) != len(tasks) for row in rows):
                raise ValueError(f"'a' must be {len(tasks)}x{len(tasks)}")
            m = cls(tasks)
            for j, row in enumerate(rows):
                for i, v in enumerate(row):
                    m.set(j, i, v)
        except (KeyError, TypeError, ValueError) as e:
            raise EdgekifError(f"invalid accuracy matrix: {e}") from e
        return m

    def to_markdown(self, digits: int = 1) -> str:
        """Rows 'after <task j>', columns = task evaluated, values in %."""
        head = "| after \\ eval | " + " | ".join(self.tasks) + " |"
        rule = "|---|" + "---:|" * len(self.tasks)
        lines = [head, rule]
        for j, row in enumerate(self.a):
            cells = ["–" if _is_missing(v) else f"{100 * v:.{digits}f}" for v in row]
            lines.append(f"| after {self.tasks[j]} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def plot_heatmap(matrix: AccuracyMatrix, path: str | os.PathLike, title: str = "") -> None:
    """Annotated heatmap of the accuracy matrix in %, saved as a PNG atomically."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg without touching pyplot's global backend
    from matplotlib.figure import Figure

    T = len(matrix.tasks)
    values = np.array([[np.nan if _is_missing(v) else 100 * v for v in row] for row in matrix.a], dtype=float).reshape(T, T)
    size = 1.2 + 0.9 * max(T, 1)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(T), [f"eval on {t}" for t in matrix.tasks], rotation=30, ha="right")
    ax.set_yticks(range(T), [f"after {t}" for t in matrix.tasks])
    for j in range(T):
        for i in range(T):
            v = values[j, i]
            text, color = ("–", "black") if np.isnan(v) else (f"{v:.1f}", "white" if v < 60 else "black")
            ax.text(i, j, text, ha="center", va="center", color=color, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())  # temp file in the same dir, fsync, os.replace
