"""Multi-turn rollouts on the real server: tools, environments and recorded OpenAI agents.

Every test here trains or generates through `fastgrpo vllm-serve` on vLLM's CPU build (one
server for the module). The random tiny model never writes a tool call by itself, so the tool
tests parse every turn as calls (a tool_call_parser, the hook for models with their own
format): the turns, tool results and masks are then real. Checks are on token ids, masks and
logprobs, recomputed independently of the trainer:
- from the generator's own log (every prompt it was sent, every token it returned), the
  episodes are rebuilt by prefix: each turn's prompt must be the previous prompt plus that
  turn's tokens plus a reply, so nothing was ever re-tokenized;
- logprobs against a plain transformers forward of the initial model over the same tokens
  (float32 on both sides; their differences are kernel rounding, 2e-3 as in test_trainer).
"""

import time

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from fastgrpo import GRPOConfig, GRPOTrainer
from fastgrpo.rollouts import Environment, StepResult, Turn, run_episodes
from fastgrpo.rollouts.agent import agent_rollout_func
from fastgrpo.rollouts.chat import ChatTokens
from fastgrpo.rollouts.tool_calls import ParsedTurn, ToolCall
from fastgrpo.trainer.generation import Sampling, ServerBackend

PROBE_TOL = 2e-3
STOPS = list(range(100, 140))  # about a tenth of the tiny vocabulary: most turns stop early


@pytest.fixture(scope="module")
def server(server_factory, tiny_qwen2):
    return server_factory(["--model", tiny_qwen2, "--dtype", "float32", "--max-model-len", "2048"])


def config(tmp_path, server, **overrides) -> GRPOConfig:
    port = int(server.base_url.rsplit(":", 1)[1])
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=96, learning_rate=5e-3, max_steps=1,
                    logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, bf16=False,
                    disable_tqdm=True, use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1",
                    vllm_server_port=port, generation_kwargs={"stop_token_ids": STOPS})
    settings.update(overrides)
    return GRPOConfig(**settings)


def questions(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {a} + 3?"}] for a in range(n)],
                              "solution": [str(a + 3) for a in range(n)]})


def length_reward(completions, completion_ids, **kwargs):
    return [len(ids) / 100 for ids in completion_ids]


def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: what to look up
    """
    return f"the value of {key} is {len(key) * 7}"


def calls_lookup(text: str) -> ParsedTurn:
    return ParsedTurn("", [ToolCall("lookup", {"key": f"k{len(text)}"})])


class GeneratorLog:
    """Every prompt a server backend sent and what came back: of one backend, or (monkeypatch) of every one,
    also those a thread of the trainer makes for itself."""

    def __init__(self, backend=None, monkeypatch=None):
        self.calls = []
        real = ServerBackend.generate

        def generate(this, prompt_ids, sampling, seeds, max_tokens=None):
            comps = real(this, prompt_ids, sampling, seeds, max_tokens)
            for i, prompt in enumerate(prompt_ids):
                self.calls.append((list(prompt), list(comps.token_ids[i][0]), list(comps.logprobs[i][0])))
            return comps

        if monkeypatch is not None:
            monkeypatch.setattr(ServerBackend, "generate", generate)
        else:
            backend.generate = lambda *args, **kwargs: generate(backend, *args, **kwargs)

    def episodes(self) -> list[dict]:
        """The episodes as chains of calls: a call continues another when its prompt starts with that call's
        prompt and output. Returns each chain's tokens and the positions (in the whole sequence) it generated."""
        children = set()
        parent = {}
        for j, (prompt, _, _) in enumerate(self.calls):
            for i, (p, out, _) in enumerate(self.calls[:j]):
                if len(prompt) > len(p) + len(out) and prompt[: len(p) + len(out)] == p + out:
                    parent[j] = i  # the longest such prefix wins (later calls continue earlier ones)
            if j in parent:
                children.add(parent[j])
        chains = []
        for j in range(len(self.calls)):
            if j in children:
                continue
            chain = [j]
            while chain[0] in parent:
                chain.insert(0, parent[chain[0]])
            prompt, out, _ = self.calls[j]
            generated, logprobs = {}, {}
            for k in chain:
                p, o, lp = self.calls[k]
                for offset, (token, value) in enumerate(zip(o, lp)):
                    generated[len(p) + offset] = token
                    logprobs[len(p) + offset] = value
            chains.append({"tokens": prompt + out, "first_prompt": self.calls[chain[0]][0], "turns": len(chain),
                           "generated": generated, "logprobs": logprobs})
        return chains


class KeepRound(TrainerCallback):
    """Each step's round of micro-batches as trained; `round`: the first (before any optimizer step changed the
    weights)."""

    def __init__(self, trainer):
        self.trainer, self.rounds = trainer, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.rounds.append([p for m in self.trainer._buffered for p in m.get("parts", [m])])

    @property
    def round(self):
        return self.rounds[0]


def rows_of(micro_batches) -> list[dict]:
    rows = []
    for m in micro_batches:
        for r in range(m["prompt_ids"].shape[0]):
            prompt = m["prompt_ids"][r][m["prompt_mask"][r].bool()].tolist()
            keep = m["completion_attention"][r].bool()
            rows.append({"prompt": prompt, "completion": m["completion_ids"][r][keep].tolist(),
                         "mask": m["completion_mask"][r][keep].tolist(),
                         "sampling_logps": m["sampling_logps"][r][keep].tolist(), "micro": m, "row": r})
    return rows


@pytest.mark.slow
def test_tool_episodes_train_on_exactly_the_generated_tokens_with_the_mask_on_them(server, tiny_qwen2, tmp_path):
    trainer = GRPOTrainer(tiny_qwen2, [length_reward], args=config(tmp_path, server, max_tool_calling_iterations=2),
                          train_dataset=questions(), tools=[lookup], tool_call_parser=calls_lookup)
    log = GeneratorLog(trainer.backend)
    keep = KeepRound(trainer)
    trainer.add_callback(keep)
    trainer.train()
    trainer.close()

    episodes, rows = log.episodes(), rows_of(keep.round)
    assert len(rows) == 8 and len(episodes) == 8
    assert max(e["turns"] for e in episodes) == 3  # two rounds of tool results, then the last turn
    by_tokens = {tuple(e["tokens"]): e for e in episodes}
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32).eval()
    for row in rows:
        # The trained ids are the generator's: prompt + completion is a chain's whole sequence, token for token.
        episode = by_tokens[tuple(row["prompt"] + row["completion"])]
        assert row["prompt"] == episode["first_prompt"]
        start = len(row["prompt"])
        # The loss mask is exactly the set of positions the generator sampled.
        assert {start + i for i, m in enumerate(row["mask"]) if m} == set(episode["generated"])
        # The generator's logprobs on them, and a transformers forward over the same tokens agrees.
        for i, m in enumerate(row["mask"]):
            assert row["sampling_logps"][i] == (episode["logprobs"][start + i] if m else 0.0)
        with torch.no_grad():
            logits = reference(torch.tensor([row["prompt"] + row["completion"]])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        ours = [logp[start + i - 1, t].item() for i, t in enumerate(row["completion"]) if row["mask"][i]]
        theirs = [lp for lp, m in zip(row["sampling_logps"], row["mask"]) if m]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < PROBE_TOL
        # The tool results are in the sequence, outside the mask.
        masked = [t for t, m in zip(row["completion"], row["mask"]) if not m]
        if episode["turns"] > 1:
            assert "the value of k" in tokenizer.decode(masked)
    # The trainer's forward over these interleaved rows (prompt sharing on: 4 rows per prompt) gives the same
    # logprobs as the plain forward.
    assert trainer._share_prompts
    micro = keep.round[0]
    with torch.no_grad():
        shared = trainer._per_token_logps(reference, micro)
    for r in range(micro["prompt_ids"].shape[0]):
        ids = torch.cat([micro["prompt_ids"][r][micro["prompt_mask"][r].bool()],
                         micro["completion_ids"][r][micro["completion_attention"][r].bool()]])
        with torch.no_grad():
            logp = torch.log_softmax(reference(ids[None]).logits[0].float(), -1)
        start = int(micro["prompt_mask"][r].sum())
        for i in range(int(micro["completion_attention"][r].sum())):
            if micro["completion_mask"][r, i]:
                assert abs(shared[r, i].item() - logp[start + i - 1, ids[start + i]].item()) < 1e-4
    metrics = trainer.state.log_history[0]
    assert metrics["multi_turn/turns_max"] == 3 and metrics["completions/env_tokens_mean"] > 0
    assert metrics["tools/call_frequency"] > 0 and metrics["tools/failure_frequency"] == 0


def raises(key: str) -> str:
    """Raises.

    Args:
        key: anything
    """
    raise RuntimeError(f"no such key {key}")


def hangs(key: str) -> str:
    """Sleeps past its timeout.

    Args:
        key: anything
    """
    time.sleep(30)
    return "late"


def megabyte(key: str) -> str:
    """Returns 1 MB.

    Args:
        key: anything
    """
    return "x" * 2**20


def calls_all_three(text: str) -> ParsedTurn:
    return ParsedTurn("", [ToolCall(name, {"key": "a"}) for name in ("raises", "hangs", "megabyte")])


@pytest.mark.slow
def test_a_tool_that_raises_hangs_or_returns_a_megabyte_is_an_error_result_not_a_crash(server, tiny_qwen2,
                                                                                        tmp_path):
    texts = []

    def keep_texts(completions, **kwargs):
        texts.extend("\n".join(m["content"] for m in c) for c in completions)
        return [0.0] * len(completions)

    trainer = GRPOTrainer(tiny_qwen2, [keep_texts, length_reward],
                          # The tiny tokenizer spends about a token per character: room for three error results.
                          args=config(tmp_path, server, max_steps=2, max_tool_calling_iterations=1, tool_timeout=0.2,
                                      max_completion_length=440),
                          train_dataset=questions(), tools=[raises, hangs, megabyte], tool_call_parser=calls_all_three)
    began = time.perf_counter()
    trainer.train()
    trainer.close()
    assert trainer.state.global_step == 2
    assert time.perf_counter() - began < 25  # no hung tool was waited for (30 s each)
    for step in trainer.state.log_history[:2]:
        calls = step["tools/call_frequency"]
        assert calls > 0 and step["tools/failure_frequency"] == 1.0
        for kind in ("raised", "timeout", "too_large"):
            assert step[f"tools/failures/{kind}"] == pytest.approx(calls / 3)
    joined = "\n".join(texts)
    assert "raised RuntimeError: no such key a" in joined
    assert "did not return within 0.2 seconds" in joined
    assert "returned 1048576 characters, more than the limit of 4096" in joined


class SayMore(Environment):
    """Asks for more twice; rewards each turn by its text's length. reset adds the row's solution to the prompt."""

    def reset(self, solution, **row):
        self.turns = 0
        return f"Context: {solution}"

    def step(self, turn):
        self.turns += 1
        return StepResult("Say more." if self.turns < 3 else None, reward=len(turn) / 100, done=self.turns == 3)


@pytest.mark.slow
def test_an_environments_turn_rewards_sum_into_the_reward(server, tiny_qwen2, tmp_path):
    trainer = GRPOTrainer(tiny_qwen2, None, args=config(tmp_path, server, max_completion_length=160),
                          train_dataset=questions(), environment_factory=SayMore)
    log = GeneratorLog(trainer.backend)
    trainer.train()
    trainer.close()
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    episodes = log.episodes()
    assert all("Context: " in tokenizer.decode(e["first_prompt"]) for e in episodes)
    # The reward, recomputed from what the generator returned: the sum over turns of len(turn text) / 100,
    # only for turns that ended on a stop token (a turn cut by the budget is never shown to the environment).
    expected = []
    for e in episodes:
        prompt_len = len(e["first_prompt"])
        turns, current, last = [], [], None
        for position in sorted(e["generated"]):
            if last is not None and position != last + 1:
                turns.append(current)
                current = []
            current.append(e["generated"][position])
            last = position
        turns.append(current)
        total = sum(len(tokenizer.decode(t, skip_special_tokens=True)) / 100 for t in turns if t[-1] in STOPS)
        expected.append(total)
        assert prompt_len > 0
    metrics = trainer.state.log_history[0]
    assert metrics["rewards/env_reward/mean"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    assert metrics["multi_turn/turns_max"] == 3


class Adder:
    """TRL's style (a reset, tool methods, a get_reward), for a dict environment_factory."""

    episodes = []

    def reset(self, **row):
        self.total = 0
        Adder.episodes.append(self)

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first
            b: the second
        """
        self.total = a + b
        return a + b

    def get_reward(self) -> float:
        return self.total / 100


class Echo:
    episodes = []

    def reset(self, **row):
        Echo.episodes.append(self)

    def echo(self, text: str) -> str:
        """Say it back.

        Args:
            text: what to say
        """
        return text

    async def get_reward(self) -> float:
        return 0.5


def calls_add(text: str) -> ParsedTurn:
    return ParsedTurn("", [ToolCall("add", {"a": len(text), "b": 1})])


@pytest.mark.slow
def test_a_dict_of_environments_owns_its_rewards_without_reward_funcs(server, tiny_qwen2, tmp_path):
    """Each example's `environment` picks its environment; each environment class with a get_reward is a reward
    function (TRL's), so no reward_funcs are needed. Every turn calls `add`: a tool of Adder, unknown to Echo."""
    Adder.episodes, Echo.episodes = [], []
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Add."}], [{"role": "user", "content": "Echo."}]],
                              "environment": ["add", "echo"]})
    trainer = GRPOTrainer(tiny_qwen2, None, args=config(tmp_path, server, max_tool_calling_iterations=1),
                          train_dataset=data, environment_factory={"add": Adder, "echo": Echo},
                          tool_call_parser=calls_add)
    assert trainer.reward_func_names == ["Adder", "Echo"]
    trainer.train()
    trainer.close()
    assert len(Adder.episodes) == len(Echo.episodes) == 4  # the round's two prompts, four episodes each
    metrics = trainer.state.log_history[0]
    assert metrics["rewards/Adder/mean"] == pytest.approx(sum(e.get_reward() for e in Adder.episodes) / 4)
    assert all(e.total > 1 for e in Adder.episodes)  # every Adder episode ran its call
    assert metrics["rewards/Echo/mean"] == 0.5 and "rewards/env_reward/mean" not in metrics
    # One call per episode (the next turn's are past max_tool_calling_iterations): Echo's fail, Adder's do not.
    assert metrics["tools/call_frequency"] == 1.0 and metrics["tools/failure_frequency"] == 0.5


def check_rows_are_episodes(rows, episodes) -> None:
    """Every trained row is a logged episode token for token, its mask exactly that episode's generated positions,
    its sampler logprobs the generator's."""
    by_tokens = {tuple(e["tokens"]): e for e in episodes}
    for row in rows:
        episode = by_tokens[tuple(row["prompt"] + row["completion"])]
        start = len(row["prompt"])
        assert row["prompt"] == episode["first_prompt"]
        assert {start + i for i, m in enumerate(row["mask"]) if m} == set(episode["generated"])
        assert all(lp == (episode["logprobs"][start + i] if m else 0.0)
                   for i, (lp, m) in enumerate(zip(row["sampling_logps"], row["mask"])))


@pytest.mark.slow
def test_async_episodes_run_ahead_within_the_bound_on_exactly_the_generated_tokens(server, tiny_qwen2, tmp_path,
                                                                                   monkeypatch):
    log = GeneratorLog(monkeypatch=monkeypatch)  # the look-ahead thread has a backend of its own
    trainer = GRPOTrainer(tiny_qwen2, None, args=config(tmp_path, server, max_steps=3, max_completion_length=160,
                                                        async_generation=True),
                          train_dataset=questions(), environment_factory=SayMore)
    keep = KeepRound(trainer)
    trainer.add_callback(keep)
    trainer.train()
    trainer.close()
    assert trainer.state.global_step == 3 and len(keep.rounds) == 3
    episodes = log.episodes()
    for micro_batches in keep.rounds:
        check_rows_are_episodes(rows_of(micro_batches), episodes)
    steps = [h for h in trainer.state.log_history if "reward" in h]
    assert all(h["async/staleness_max"] <= 1 for h in steps) and max(h["async/staleness_max"] for h in steps) == 1
    assert all(h["multi_turn/turns_max"] == 3 for h in steps)


def chat_agent(prompt, base_url, seeds=(1000, 1001, 1002)):
    """An agent as one writes it against the OpenAI API: three calls, asking for more between them."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = list(prompt)
    for i, seed in enumerate(seeds):
        reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=8, seed=seed,
                                               temperature=1.0)
        messages.append(reply.choices[0].message)  # the reply object itself, as agents often do
        if i < len(seeds) - 1:
            messages.append({"role": "user", "content": "Say more."})
    return reply.choices[0].message.content


class AskMore(Environment):
    def __init__(self):
        self.turns = 0

    def step(self, turn):
        self.turns += 1
        return StepResult("Say more.", done=self.turns == 3)


@pytest.mark.slow
def test_an_openai_agent_recorded_by_the_server_gives_the_tokens_of_a_direct_rollout(server, tiny_qwen2):
    from fastgrpo.client import VLLMClient

    prompt = [{"role": "user", "content": "What is 4 + 3?"}]
    client = VLLMClient(base_url=server.base_url)
    client.open_rollout("agent-1", temperature=1.0)  # the base model, as the trainer opens it
    chat_agent(prompt, client.rollout_url("agent-1"))
    (recorded,) = client.rollout("agent-1").sequences
    assert recorded.calls == 3

    # The same episode driven directly: the same seeds, turns of at most 8 tokens, the same replies.
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    backend = ServerBackend(server.base_url, "127.0.0.1", 0, 60.0)
    sampling = Sampling(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=8)

    def generate(prompts, budgets, seeds):
        comps = backend.generate(prompts, sampling, seeds, max_tokens=[min(8, b) for b in budgets])
        # A turn cut at 8 tokens is a whole turn here, as for the agent.
        return [Turn(c[0], lp[0], True) for c, lp in zip(comps.token_ids, comps.logprobs)]

    chat = ChatTokens(tokenizer)
    (episode,) = run_episodes([chat.prompt(prompt)], [AskMore()], generate, chat,
                              lambda ids: tokenizer.decode(ids, skip_special_tokens=True), 200,
                              seed_of=lambda i, turn: 1000 + turn)
    backend.close()
    assert recorded.prompt_ids == episode.prompt_ids
    assert recorded.completion_ids == episode.completion_ids
    assert recorded.completion_mask == episode.mask and episode.turns == 3
    assert max(abs(a - b) for a, b in zip(recorded.logprobs, episode.logprobs)) < 1e-4
    client.delete_rollout("agent-1")
    with pytest.raises(Exception, match="no rollout"):
        client.rollout("agent-1")
    client.close()


@pytest.mark.slow
def test_the_trainer_trains_on_recorded_agents(server, tiny_qwen2, tmp_path):
    seen = []

    def answer_length(completions, agent_output, **kwargs):
        seen.extend(agent_output)
        return [len(a or "") / 10 for a in agent_output]

    trainer = GRPOTrainer(tiny_qwen2, [answer_length], args=config(tmp_path, server, max_steps=2),
                          train_dataset=questions(), rollout_func=agent_rollout_func(
                              lambda prompt, url: chat_agent(prompt, url, seeds=(None, None))))
    keep = KeepRound(trainer)
    trainer.add_callback(keep)
    trainer.train()
    trainer.close()
    assert trainer.state.global_step == 2 and len(seen) == 16
    rows = rows_of(keep.round)
    for row in rows:  # two calls: the model's tokens, "Say more." and the template's markers, the model's again
        ones = [i for i, m in enumerate(row["mask"]) if m]
        assert 0 in row["mask"][ones[0]:ones[-1]] and row["mask"][0] == 1
    assert trainer.state.log_history[0]["completions/env_tokens_mean"] > 0
