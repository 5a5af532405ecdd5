"""GET /health: whether the server serves (200 only when "ok"), and what it serves with."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from fastgrpo.protocol import HealthResponse
from fastgrpo.serve.state import ServerState, State

router = APIRouter()


def served_dtype(state: ServerState) -> str:
    engine = state.engine.engine
    if engine is None:
        return state.settings.dtype
    return str(engine.model_config.dtype).removeprefix("torch.")


def health_status(state: ServerState) -> str:
    engine = state.engine
    if state.startup_error or not (engine.alive or engine.engine is None):
        return "failed"
    if not state.ready:
        return "starting"
    if not state.weights_consistent:
        return "degraded"
    return "ok"


@router.get("/health", response_model=HealthResponse)
async def health(state: State):
    engine, settings, status = state.engine, state.settings, health_status(state)
    body = HealthResponse(
        status=status, model=settings.model, dp_ranks=engine.describe(),
        device_type="cpu" if engine.on_cpu else "gpu",
        tensor_parallel_size=settings.tensor_parallel_size, data_parallel_size=settings.data_parallel_size,
        world_size=settings.world_size, weight_transfer_ranks=state.weight_transfer_ranks,
        weight_version=state.weight_version, instance=state.instance,
        abandoned_generations=state.abandoned_generations,
        weights_consistent=state.weights_consistent, weight_push=state.push_phase,
        last_push_error=state.last_push_error, weight_transfer_backend=engine.backend,
        dtype=served_dtype(state), max_model_len=state.max_model_len,
    )
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503)
