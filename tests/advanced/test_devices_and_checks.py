import pytest
import torch

from modelalloy.api import merge_state_dicts
from modelalloy.errors import MethodError
from modelalloy.methods import MergeContext, TensorGroup, get_method

from .helpers import make_models

METHODS = [("lines", {}), ("consensus", {}), ("tall_masks", {}), ("pcb", {}), ("tsv_m", {}),
           ("resm", {}), ("widen", {}), ("opcm", {}), ("doge", {"steps": 5}),
           ("optmerge", {"steps": 5})]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "params"), METHODS)
def test_cuda_matches_cpu(method, params):
    base, experts = make_models(3, seed=11, shape=(16, 12))
    cpu = merge_state_dicts(method, base, experts, **params)
    gpu = merge_state_dicts(method, base, experts, device="cuda", **params)
    for n in base:
        torch.testing.assert_close(gpu[n].cpu(), cpu[n], rtol=1e-4, atol=1e-4, msg=n)


def test_whole_model_statistics_refuse_per_tensor_parameters():
    spec = get_method("pcb")
    p1 = spec.resolve(1, {"keep_ratio": 0.1}, "t")
    p2 = spec.resolve(1, {"keep_ratio": 0.5}, "t")

    def groups():
        for name, p in (("a", p1), ("b", p2)):
            yield TensorGroup(name=name, base=torch.zeros(3), experts=[torch.ones(3)],
                              params=p, ctx=MergeContext(name=name))

    with pytest.raises(MethodError, match="keep_ratio"):
        spec.prepare(groups)


def test_base_is_required():
    base, experts = make_models(2)
    for method, _ in METHODS:
        with pytest.raises(MethodError, match="base"):
            merge_state_dicts(method, None, experts)
