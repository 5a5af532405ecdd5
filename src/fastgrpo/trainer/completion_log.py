"""What a round leaves for the log besides its metrics: what reward functions logged, and the completions
table (log_completions). Every process takes part in the gathers; the main process keeps the rows."""

from collections import defaultdict

import torch

from fastgrpo.trainer.reporting import report_completions
from fastgrpo.trainer.rewards import completion_text


class RewardLogs:
    """What reward functions log through TRL's `log_extra(column, values)` and `log_metric(name, value)` kwargs."""

    def __init__(self):
        self.columns: dict[str, list] = defaultdict(list)
        self.metrics: dict[str, list[float]] = defaultdict(list)

    def extra(self, column: str, values: list) -> None:
        self.columns[column].extend(values)

    def metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))


def flush_reward_logs(accelerator, logged: RewardLogs, metrics, rows: int, with_columns: bool) -> dict[str, list]:
    """What reward functions logged this round, over every process: log_metric values averaged into the
    metrics, log_extra columns gathered for the completions table (with_columns). The names are agreed first,
    in one order, so every process issues the same gathers whatever its own functions logged."""
    from accelerate.utils import gather_object

    names = sorted({n for rank in gather_object([sorted(logged.metrics)]) for n in rank})
    for name in names:
        values = logged.metrics.get(name, [])
        totals = accelerator.gather(torch.tensor([[sum(values), len(values)]], dtype=torch.float64,
                                                 device=accelerator.device)).sum(0)
        metrics[name].append((totals[0] / totals[1].clamp(min=1)).item())
    if not with_columns:
        return {}
    columns = sorted({c for rank in gather_object([sorted(logged.columns)]) for c in rank})
    return {c: gather_object(list(logged.columns.get(c, [None] * rows))) for c in columns}


class CompletionTable:
    """The rows of log_completions since the last log (at most two rounds' worth), reported at each log."""

    def __init__(self, reward_func_names: list[str], keep: int, num_to_print: int | None, report_to):
        self.reward_func_names, self.keep = reward_func_names, keep
        self.num_to_print, self.report_to = num_to_print, report_to
        self.rows: list[dict] = []

    def add(self, accelerator, step: int, prompts, texts, all_rewards, advantages, evaluating: bool,
            extra_columns: dict[str, list]) -> None:
        """Keep this round's rows (all processes): step, prompt, completion, rewards, advantage, extra columns."""
        from accelerate.utils import gather_object

        prompts = gather_object([completion_text(p[-1]) if isinstance(p, list) else p for p in prompts])
        texts = gather_object(list(texts))
        if not accelerator.is_main_process:
            return
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            row = {"step": step, "prompt": prompt, "completion": text}
            row.update({name: all_rewards[i, f].item() for f, name in enumerate(self.reward_func_names)})
            row["advantage"] = advantages[i].item()
            row.update({column: values[i] if i < len(values) else None for column, values in extra_columns.items()})
            if evaluating:
                row["split"] = "eval"
            self.rows.append(row)
        del self.rows[: -self.keep]

    def report(self) -> None:
        rows, self.rows = self.rows, []
        if rows:
            report_completions(rows, self.reward_func_names, self.num_to_print, self.report_to)
