"""`fastgrpo vllm-serve --headless`: this machine's DP ranks of a server whose head runs elsewhere.

It serves no HTTP. Its engine cores connect to the head (`--data_parallel_address`,
`--data_parallel_rpc_port`) and take their requests and engine-wide calls from it,
weight pushes included: their workers join the trainer's weight-transfer group
themselves, at 1 + dp_rank x TP + their TP rank. The process lives as long as its
engines: if one dies it exits non-zero, and the head notices the rank's silence
(serve/engines.py, `watch`).
"""

import logging
import signal

from fastgrpo.serve.engines import ServerSettings, engine_args, prepare_process

log = logging.getLogger("fastgrpo.serve")


def run_headless(settings: ServerSettings, on_cpu: bool) -> int:
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.network_utils import get_tcp_uri
    from vllm.v1.engine.utils import CoreEngineProcManager
    from vllm.v1.executor import Executor

    backend = settings.engine_backend(on_cpu)
    prepare_process(settings, on_cpu, backend)
    config = engine_args(settings, on_cpu, backend).create_engine_config(
        usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
    first = config.parallel_config.data_parallel_rank
    log.info("starting DP rank(s) %s of %d; joining the head at %s:%d", list(range(first, first + settings.local_ranks)),
             settings.data_parallel_size, settings.data_parallel_address, settings.data_parallel_rpc_port)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    manager = CoreEngineProcManager(
        local_engine_count=settings.local_ranks, start_index=first, local_start_index=0, vllm_config=config,
        local_client=False, handshake_address=get_tcp_uri(settings.data_parallel_address,
                                                          settings.data_parallel_rpc_port),
        executor_class=Executor.get_class(config), log_stats=False)
    try:
        manager.monitor_engine_liveness()  # returns when one of them exits
        gone = manager.finished_procs()
        if gone:
            print(f"fastgrpo vllm-serve --headless: error: engine core(s) exited: {gone}", flush=True)
            return 1
        return 0
    finally:
        manager.shutdown()
