"""Run records: metrics as JSON lines, a plot of reward and completion length per step, completion tables."""

import json
from pathlib import Path

from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Append every log (with its step) to `path` as one JSON object per line, on the main process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str = "GRPO") -> Path:
    """Reward (with its group std band) and mean completion length against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "reward" in r]
    steps = [r["step"] for r in rows]
    reward = [r["reward"] for r in rows]
    length = [r.get("completions/mean_length", float("nan")) for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, reward, marker="o", color="tab:blue")
    top.set_ylabel("mean reward")
    top.set_title(title)
    top.grid(alpha=0.3)
    bottom.plot(steps, length, marker="o", color="tab:orange")
    bottom.set_ylabel("mean completion length (tokens)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def report_completions(rows: list[dict], reward_names: list[str], shown: int | None, report_to) -> None:
    """Print `shown` of the rows (None: all), and log them all as one table ("completions": step, prompt,
    completion, each reward, advantage) to the integrations of `report_to` that take tables: W&B and trackio."""
    from tqdm import tqdm

    for row in rows if shown is None else rows[: max(shown, 0)]:
        rewards = " ".join(f"{name} {row[name]:.2f}" for name in reward_names)
        tqdm.write(f"step {row['step']} | {rewards} | adv {row['advantage']:+.2f} | "
                   f"{' '.join(row['prompt'].split())[:80]} -> {' '.join(row['completion'].split())[:160]}")
    report_to = report_to or []
    tables = []
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            tables.append((wandb, wandb.run.log))
    if "trackio" in report_to:
        import trackio

        tables.append((trackio, trackio.log))
    if tables and rows:
        import pandas as pd

        frame = pd.DataFrame(rows)
        for module, log in tables:
            log({"completions": module.Table(dataframe=frame)})
