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
"""

import datetime
import functools
import os

import torch.distributed as dist
from torch.distributed import distributed_c10d

ENV = "FASTGRPO_SHARED_GLOO_DEVICE"


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
    """The plugin: from here on, torch builds every gloo group of this process on the shared device."""
    if os.environ.get(ENV) == "1":
        distributed_c10d.ProcessGroupGloo = SharedDeviceGloo
