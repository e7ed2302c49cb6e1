"""Bad inputs to `lora_linear_grouped` (issue 20 items 1 and 6): each refused with an error naming the problem
before anything runs (no implementation row is chosen: dispatch.calls unchanged), in eager mode; the static
ones also by the custom op's fake under torch.compile, the sizes' values when the compiled op runs."""
import pytest
import torch

from fused_lora import dispatch
from fused_lora.ops.grouped import lora_linear_grouped

E, M, K, N, R = 3, 7, 5, 4, 2


def good():
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(M, K, generator=g), "group_sizes": torch.tensor([3, 0, 4]),
            "weight": torch.randn(E, N, K, generator=g), "bias": torch.randn(E, N, generator=g),
            "lora_A": torch.randn(E, R, K, generator=g), "lora_B": torch.randn(E, N, R, generator=g),
            "scaling": 0.5, "dropout_p": 0.0, "seed": None, "transposed": False}


BAD = {
    # group_sizes: type, dtype, rank, length, device-free values
    "sizes_list": ({"group_sizes": [3, 0, 4]}, TypeError, "group_sizes must be an int64 tensor of shape \\(E,\\), got list"),
    "sizes_int32": ({"group_sizes": torch.tensor([3, 0, 4], dtype=torch.int32)}, TypeError,
                    "group_sizes has dtype torch.int32, expected torch.int64"),
    "sizes_2d": ({"group_sizes": torch.tensor([[3, 0, 4]])}, ValueError, "group_sizes must be 1-D"),
    "sizes_short": ({"group_sizes": torch.tensor([3, 4])}, ValueError,
                    "group_sizes has 2 entries but weight has 3 experts"),
    "sizes_negative": ({"group_sizes": torch.tensor([5, -2, 4])}, ValueError,
                       "group_sizes holds -2 \\(expert 1\\): row counts must be >= 0"),
    "sizes_wrong_sum": ({"group_sizes": torch.tensor([3, 1, 4])}, ValueError, "group_sizes sums to 8 but x has 7 rows"),
    # the 3-D weight
    "weight_2d": ({"weight": torch.randn(N, K)}, ValueError, "weight must be 3-D, got shape \\(4, 5\\)"),
    "weight_wrong_k": ({"weight": torch.randn(E, N, K + 1)}, ValueError,
                      "weight has shape \\(3, 4, 6\\) but x has \\(7, 5\\): expected \\(E, N, 5\\)"),
    "weight_not_transposed": ({"weight": torch.randn(E, N, K), "transposed": True}, ValueError,
                              "expected \\(E, 5, N\\) \\(transposed=True\\); it reads as \\(E, N, K\\): "
                              "transposed=False"),
    "weight_transposed": ({"weight": torch.randn(E, K, N)}, ValueError,  # GPT-OSS' layout without the flag
                          "expected \\(E, N, 5\\); it reads as \\(E, K, N\\): transposed=True"),
    "no_experts": ({"weight": torch.randn(0, N, K), "group_sizes": torch.zeros(0, dtype=torch.int64),
                    "bias": None, "lora_A": torch.randn(0, R, K), "lora_B": torch.randn(0, N, R)}, ValueError,
                   "weight has no experts"),
    # expert counts that do not match
    "lora_A_experts": ({"lora_A": torch.randn(E + 1, R, K)}, ValueError,
                       "lora_A has 4 experts \\(shape \\(4, 2, 5\\)\\) but weight has 3"),
    "lora_B_experts": ({"lora_B": torch.randn(E - 1, N, R)}, ValueError, "lora_B has 2 experts"),
    "bias_experts": ({"bias": torch.randn(E + 2, N)}, ValueError, "bias has 5 experts"),
    # the per-expert shapes
    "bias_1d": ({"bias": torch.randn(N)}, ValueError, "bias must be 2-D"),
    "bias_wrong_n": ({"bias": torch.randn(E, N + 1)}, ValueError, "bias has shape \\(3, 5\\), expected \\(3, 4\\)"),
    "lora_A_wrong_k": ({"lora_A": torch.randn(E, R, K + 2)}, ValueError, "lora_A has shape \\(3, 2, 7\\)"),
    "lora_B_wrong_r": ({"lora_B": torch.randn(E, N, R + 1)}, ValueError,
                       "lora_B has shape \\(3, 4, 3\\), expected \\(E, N, r\\) = \\(3, 4, 2\\)"),
    "lora_A_2d": ({"lora_A": torch.randn(R, K)}, ValueError, "lora_A must be 3-D"),
    "only_lora_B": ({"lora_A": None}, TypeError, "lora_A and lora_B must both be tensors, or both None"),
    # dtypes, types, values
    "x_int": ({"x": torch.ones(M, K, dtype=torch.int64)}, TypeError, "x has dtype torch.int64"),
    "weight_dtype": ({"weight": torch.randn(E, N, K, dtype=torch.float64)}, TypeError,
                     "weight has dtype torch.float64 but x has torch.float32"),
    "x_3d": ({"x": torch.randn(1, M, K)}, ValueError, "x must be 2-D"),
    "x_not_tensor": ({"x": [[1.0]]}, TypeError, "x must be a tensor, got list"),
    "transposed_str": ({"transposed": "yes"}, TypeError, "transposed must be a bool"),
    "dropout_1": ({"dropout_p": 1.0, "seed": 3}, ValueError, "lora_linear_grouped: dropout_p must be in \\[0, 1\\)"),
    "dropout_no_seed": ({"dropout_p": 0.1}, ValueError, "lora_linear_grouped: a seed .* is required"),
    "seed_negative": ({"dropout_p": 0.1, "seed": torch.tensor(-4)}, ValueError,
                      "lora_linear_grouped: seed must be >= 0"),
    "scaling_nan": ({"scaling": float("nan")}, ValueError, "lora_linear_grouped: scaling must be finite"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_is_refused_before_anything_runs(case):
    change, error, message = case
    kwargs = {**good(), **change}
    before = dict(dispatch.calls)
    with pytest.raises(error, match=message):
        lora_linear_grouped(**kwargs)
    assert dict(dispatch.calls) == before, "an implementation ran before the inputs were refused"


def test_good_inputs_run():
    """The baseline the refusals change one thing of."""
    assert lora_linear_grouped(**good()).shape == (M, N)


@pytest.mark.parametrize("name", ["sizes_short", "lora_A_experts", "weight_wrong_k", "sizes_negative",
                                  "sizes_wrong_sum"])
def test_refused_under_torch_compile(name):
    """Under torch.compile(fullgraph=True) the static problems are refused while tracing (torch reports the
    check's error inside its own, message included); the sizes' values by the op body when the compiled op
    runs, with the eager error itself."""
    torch._dynamo.reset()
    change, error, message = BAD[name]
    kwargs = {**good(), **change}
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in kwargs.items() if k not in tensors}
    compiled = torch.compile(lambda t: lora_linear_grouped(**t, **rest), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=message) as raised:
        compiled(tensors)
    if name.startswith("sizes_") and name != "sizes_short":
        assert raised.type is error
