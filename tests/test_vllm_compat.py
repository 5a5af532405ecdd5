"""fastgrpo.vllm_compat on the installed vLLM (0.32 here), and its shims for 0.26's call shapes."""

import sys

import pytest

from fastgrpo import vllm_compat


def test_trainer_init_arguments_accept_both_releases_call_shapes():
    info, config = object(), object()
    assert vllm_compat.trainer_init_arguments((info,), {}) == (info, None)  # 0.32: trainer_init(init_info)
    assert vllm_compat.trainer_init_arguments((), {"config": config, "init_info": info}) == (info, config)  # 0.26
    assert vllm_compat.trainer_init_arguments((config, info), {}) == (info, config)
    with pytest.raises(TypeError, match="init_info"):
        vllm_compat.trainer_init_arguments((), {})


def test_the_installed_release_is_told_apart_by_its_own_signatures():
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    from fastgrpo.transfer.nccl import NcclSender

    init = NcclSender.worker_init_info("127.0.0.1", 1234, 1, 2, 4096, 10)
    update = NcclSender.worker_update_fields(4096)
    # Whichever release: the packed parameters travel exactly once, in the place it reads them from.
    assert ("packed" in init) != ("packed" in update)
    assert ("packed" in init) == vllm_compat.nccl_packed_in_init()
    NCCLWeightTransferInitInfo(**init)  # parses


def test_ipc_parts_tell_vllms_ipc_engine_packed_mode_once_in_the_place_it_reads_it():
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo, IPCWeightTransferUpdateInfo

    from fastgrpo.transfer.ipc import IpcSender

    init = IpcSender.worker_init_info("127.0.0.1", 1234, 1, 2, 4096, 10)
    update = IpcSender.worker_update_fields(4096)
    assert [init, update].count({"packed": True}) == 1 and {} in (init, update)
    assert IPCWeightTransferInitInfo(**init).__dict__.get("packed", True)  # 0.32 reads it here, 0.26 per update
    # A part's update info, as the server builds it, parses in vLLM's own class (CUDA's handle aside).
    part = IPCWeightTransferUpdateInfo(names=["a"], dtype_names=["float32"], shapes=[[2]], tensor_sizes=[8],
                                       ipc_handles={"GPU-uuid": ()}, **update)
    assert part.tensor_sizes == [8]


def test_our_worker_engines_are_concrete_and_request_errors_include_vllms_own():
    from vllm.exceptions import VLLMValidationError

    from fastgrpo.transfer.gloo import GlooWeightTransferEngine
    from fastgrpo.transfer.shm import ShmWeightTransferEngine

    assert not GlooWeightTransferEngine.__abstractmethods__ and not ShmWeightTransferEngine.__abstractmethods__
    assert VLLMValidationError in vllm_compat.request_error_types()
    assert ValueError in vllm_compat.request_error_types()


def test_a_module_imported_without_ray_sees_a_placeholder_that_names_itself_and_is_removed_after(tmp_path,
                                                                                               monkeypatch):
    (tmp_path / "needs_ray_at_import.py").write_text("import ray\nRAY = ray\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(vllm_compat.importlib.util, "find_spec", lambda name: None)  # as if ray were absent
    module = vllm_compat.import_without_ray("needs_ray_at_import")
    assert "ray" not in sys.modules
    with pytest.raises(ImportError, match="ray is not installed"):
        module.RAY.init
