"""POST /reset_prefix_cache: empty the prefix cache of every DP rank."""

from fastapi import APIRouter

from fastgrpo.serve.errors import ApiError
from fastgrpo.serve.state import State

router = APIRouter()


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(state: State):
    if not state.engine.alive:
        raise ApiError(503, "engine_dead", str(state.engine.dead_error()))
    await state.engine.each("reset_prefix_cache")  # every DP rank
    return {"ok": True}
