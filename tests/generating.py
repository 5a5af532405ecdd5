"""A generation that is still running while a test breaks something (a DP rank, a node)."""

import threading
import time

import httpx


class LongGeneration(threading.Thread):
    """POSTs a round of 96 prompts x `max_tokens` (ignore_eos) to /generate in the background; `response` once
    it ends. Started, it waits `lead_s` for the engines to be busy with it."""

    def __init__(self, base_url: str, max_tokens: int = 200, lead_s: float = 0.5):
        super().__init__(daemon=True)
        self.base_url, self.max_tokens, self.lead_s = base_url, max_tokens, lead_s
        self.response: httpx.Response | None = None

    def run(self):
        self.response = httpx.post(self.base_url + "/generate", timeout=120, json={
            "prompts": [f"question {i}" for i in range(96)], "max_tokens": self.max_tokens, "ignore_eos": True})

    def start(self):
        super().start()
        time.sleep(self.lead_s)
        assert self.is_alive(), "the generation ended before anything could break under it"
