"""What a training run writes as it goes (rank 0 only): DIR/metrics.jsonl, one JSON object per logged
step, cut back to the checkpoint's step on resume, and DIR/loss.png at the end (skipped with one line
when matplotlib is missing: the run itself is done)."""
import json
from pathlib import Path

from .optional import note_missing


class Metrics:
    """DIR/metrics.jsonl (one JSON object per logged step) and DIR/loss.png; rank 0 only."""

    def __init__(self, out: Path, start_step: int):
        self.path = out / "metrics.jsonl"
        self.rows = []
        if self.path.exists():  # a resumed run drops what was logged after its checkpoint
            self.rows = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row):
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self):
        try:
            import matplotlib
        except ImportError:  # the run itself is done: skip the picture, keep the exit code
            note_missing(f"{self.path.with_name('loss.png')}", "matplotlib")
            return

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.rows:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [r["step"] for r in self.rows]
        for key in ("loss", "fm_mse", "mf_mse"):
            if key in self.rows[0]:
                ax.plot(steps, [r[key] for r in self.rows], label=key)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.path.with_name("loss.png"), dpi=90)
        plt.close(fig)
