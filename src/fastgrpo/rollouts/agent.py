"""Train on agents written against the OpenAI chat API, recorded by the server.

    def agent(prompt, base_url):                 # your agent, unchanged but for the base URL
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        messages = list(prompt)
        while True:
            reply = client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
            ...                                  # run its tool calls, append results; return at the end
        return answer

    GRPOTrainer(..., rollout_func=agent_rollout_func(agent))

Each row's episode runs `agent(prompt, base_url)` with a base URL of its own
(`{server}/rollouts/{id}/v1`), several at once in threads. The trainer opens each rollout on
its policy: the calls sample from the run's adapter (LoRA) or the base model, with the run's
temperature, top_p, top_k, min_p and repetition penalty, whatever model name and settings the
agent sends (settings it asked for otherwise are logged once). The server records each chat
call's exact tokens (serve/recordings.py); afterwards the recording becomes the row's prompt
ids, completion ids, loss mask, sampler logprobs and weight versions (checked for staleness
like any completion). The agent's return value reaches the reward functions as
`agent_output`. Server mode only: the recording lives in `fastgrpo vllm-serve`.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)


def agent_rollout_func(agent, max_concurrent: int = 32):
    """A rollout_func running `agent(prompt, base_url)` for each row; see the module docstring."""
    if not callable(agent):
        raise ValueError("agent must be callable: agent(prompt, base_url) -> anything the reward functions need")

    warned = set()

    def rollout_func(prompts: list, trainer) -> dict:
        client, a = trainer.vllm_client, trainer.args
        round_id = uuid.uuid4().hex[:12]
        ids = [f"agent-{round_id}-{trainer.accelerator.process_index}-{i}" for i in range(len(prompts))]
        sampling = {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k or -1, "min_p": a.min_p or 0.0,
                    "repetition_penalty": a.repetition_penalty}
        for rollout_id in ids:
            client.open_rollout(rollout_id, trainer.policy_adapter, **sampling)

        def run(i: int):
            try:
                return agent(prompts[i], client.rollout_url(ids[i]))
            except Exception as exc:
                raise RuntimeError(f"the agent failed on row {i} (rollout {ids[i]}): {type(exc).__name__}: "
                                   f"{exc}") from exc

        with ThreadPoolExecutor(max_workers=max(1, min(max_concurrent, len(prompts))),
                                thread_name_prefix="agent") as pool:
            outputs = list(pool.map(run, range(len(prompts))))
        limit = trainer.args.max_completion_length
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [], "stopped": [],
               "weight_versions": [], "agent_output": outputs}
        for rollout_id in ids:
            try:
                recording = client.rollout(rollout_id)
            except Exception as exc:
                raise RuntimeError(f"rollout {rollout_id} has no recording ({exc}): the agent must send its chat "
                                   "calls to the base_url it is given") from exc
            client.delete_rollout(rollout_id)
            asked = {k: v for k, v in recording.overridden.items() if k not in warned}
            if asked:
                warned.update(asked)
                logger.warning("the agent asked for %s; its calls sampled with the run's settings (%s) instead, so "
                               "the trainer's logprobs are those of the policy that sampled", asked,
                               {k: sampling[k] for k in asked})
            if len(recording.sequences) > 1:
                logger.warning("rollout %s: the agent's calls make %d separate sequences (a call did not continue "
                               "the previous one: history rewritten, or other tools); training on the last",
                               rollout_id, len(recording.sequences))
            sequence = recording.sequences[-1]
            # Longer than max_completion_length: its first tokens are exact as they stand (each was sampled from
            # those before it), the rest is cut and the episode counts as truncated.
            out["prompt_ids"].append(sequence.prompt_ids)
            out["completion_ids"].append(sequence.completion_ids[:limit])
            out["logprobs"].append(sequence.logprobs[:limit])
            out["env_mask"].append(sequence.completion_mask[:limit])
            out["stopped"].append(len(sequence.completion_ids) <= limit)
            out["weight_versions"].append(list(sequence.weight_versions))
        return out

    return rollout_func
