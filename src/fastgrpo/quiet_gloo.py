"""One gloo device per process, so that an idle vLLM engine stays idle.

Each gloo device runs a loop thread that polls its sockets with a 10 ms timeout
(`epoll_wait(fd, events, 64, 10)`, seen with strace): 100 wake-ups a second with
nothing to do. torch gives every gloo process group a device of its own, and a vLLM
worker makes 13 of them (a device group and a CPU group per parallel dimension), so an
idle worker woke 1,370 times a second, and on cores shared with the trainer each
wake-up stalls one of its OpenMP threads and, at the next barrier, all of them.

gloo serves any number of contexts from one device, so here every gloo group of the
process shares one: one loop thread, about 100 wake-ups a second. vLLM runs this as a
general plugin in every process it starts (see pyproject.toml); it acts only where
FASTGRPO_SHARED_GLOO_DEVICE=1, which fastgrpo sets for the engines it builds, so other
vLLM programs in the same environment are untouched.

The same plugin shortens the worker's spin after each message. vLLM's worker reads the engine
core's messages from shared memory and, after each one, spins on sched_yield for 1 s
(`SpinCondition(busy_loop_s=1)`) before it waits on a socket. After a generation round and
after a weight push that second of spinning lands on the trainer's cores when the two
share them: on B1 (2 cores, a bf16 server) the worker took 1.0 CPU s during each training
micro-step, which ran 9.7-10.3 s; the same micro-step without it ran in 7.3 s.

Here it spins 20 ms (FASTGRPO_ENGINE_SPIN_S): long enough that the back-to-back messages
of a decode loop or a push are still read without a socket wake-up, short enough that
nothing is left spinning once the round is over. B1, bf16 server, one run each
(bench/bench_b1.py --steps 5 --runs sync-bf16, s/step): 1 s 12.0, 50 ms 11.0, 20 ms 10.0,
5 ms 10.7. At 0 the push went from 0.9 s to 8.3 s, so some exchange in it needs the spin.
"""

import datetime
import functools
import os

import torch.distributed as dist
from torch.distributed import distributed_c10d

ENV = "FASTGRPO_SHARED_GLOO_DEVICE"
SPIN_ENV = "FASTGRPO_ENGINE_SPIN_S"  # seconds vLLM's worker spins after a message before it sleeps (vLLM: 1)
SPIN_S = 0.02


@functools.cache
def shared_device():
    """This process's gloo device (the default interface, or GLOO_SOCKET_IFNAME's), made once."""
    return dist.ProcessGroupGloo.create_default_device()


def gloo_options(timeout: datetime.timedelta) -> "dist.ProcessGroupGloo._Options":
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [shared_device()]
    return options


class SharedDeviceGloo(dist.ProcessGroupGloo):
    """ProcessGroupGloo as torch's new_group builds it (store, rank, size, timeout), on the shared device."""

    def __init__(self, store, rank, size, timeout=datetime.timedelta(minutes=30)):
        if isinstance(timeout, dist.ProcessGroupGloo._Options):
            super().__init__(store, rank, size, timeout)
        else:
            super().__init__(store, rank, size, gloo_options(timeout))


def enable() -> None:
    """Ask for the shared device in the engine processes this process starts from now on."""
    os.environ.setdefault(ENV, "1")  # FASTGRPO_SHARED_GLOO_DEVICE=0 keeps torch's device per group


def register() -> None:
    """The plugin: from here on, torch builds every gloo group of this process on the shared device, and
    vLLM's message queues spin SPIN_S after a message instead of 1 s."""
    if os.environ.get(ENV) == "1":
        distributed_c10d.ProcessGroupGloo = SharedDeviceGloo
        spin_for(float(os.environ.get(SPIN_ENV, str(SPIN_S))))


def spin_for(seconds: float) -> None:
    """Every SpinCondition vLLM makes from now on in this process spins `seconds` after a message (vLLM: 1)."""
    from vllm.distributed.device_communicators import shm_broadcast

    base = getattr(shm_broadcast.SpinCondition, "vllm_class", shm_broadcast.SpinCondition)

    class ShortSpin(base):
        vllm_class = base

        def __init__(self, is_reader, context, notify_address, busy_loop_s: float = seconds):
            super().__init__(is_reader, context, notify_address, busy_loop_s)

    shm_broadcast.SpinCondition = ShortSpin
