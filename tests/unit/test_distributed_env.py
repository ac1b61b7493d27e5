"""What ``torpor.init_distributed`` reads from the environment before it starts a group."""

from __future__ import annotations

import pytest

from torpor._distributed import local_cuda_device


@pytest.mark.parametrize(("environ", "count", "device"), [({}, 1, 0), ({"LOCAL_RANK": "3"}, 8, 3),
                                                          ({"LOCAL_RANK": " 1 "}, 2, 1)])
def test_each_process_of_a_pod_gets_the_gpu_of_its_local_rank(environ: dict[str, str], count: int,
                                                              device: int) -> None:
    assert local_cuda_device(environ, count) == device


@pytest.mark.parametrize(("environ", "count", "message"), [
    ({"LOCAL_RANK": "2"}, 2, "LOCAL_RANK=2 names no CUDA device: this process sees 2"),
    ({"LOCAL_RANK": "-1"}, 2, "LOCAL_RANK=-1 names no CUDA device"),
    ({"LOCAL_RANK": "one"}, 2, "LOCAL_RANK must be an integer, got 'one'"),
])
def test_a_local_rank_without_its_gpu_is_a_clear_error(environ: dict[str, str], count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        local_cuda_device(environ, count)
