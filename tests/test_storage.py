"""How checkpoint weights are stored: float16 and per-channel int8, unpacked to fp32 for running."""

import pytest
import torch

from handler.storage import SCALE_SUFFIX, pack_state_dict, unpack_state_dict


def state_dict_with_awkward_channels():
    torch.manual_seed(0)
    conv = torch.randn(4, 3, 3, 3)
    conv[1] *= 1e-3  # a channel a thousand times smaller keeps its own resolution
    conv[2] = 0.0  # an all-zero channel must come back as zeros, not NaN
    return {"conv.weight": conv, "bn.running_var": torch.rand(4) + 0.5, "bn.num_batches_tracked": torch.tensor(7),
            "classifier.weight": torch.randn(7, 4), "classifier.bias": torch.randn(7)}


def test_int8_stores_convolutions_in_8_bits_within_half_a_step_per_channel():
    original = state_dict_with_awkward_channels()
    packed = pack_state_dict(original, "int8")
    assert packed["conv.weight"].dtype == torch.int8
    assert packed["conv.weight" + SCALE_SUFFIX].shape == (4,)
    # Everything that is not a convolution kernel is float16; integer buffers are untouched.
    assert packed["classifier.weight"].dtype == packed["bn.running_var"].dtype == torch.float16
    assert torch.equal(packed["bn.num_batches_tracked"], original["bn.num_batches_tracked"])
    restored = unpack_state_dict(packed)
    assert set(restored) == set(original)
    assert all(restored[name].dtype == original[name].dtype for name in original)
    error = (restored["conv.weight"] - original["conv.weight"]).abs().flatten(1).amax(1)
    largest = original["conv.weight"].abs().flatten(1).amax(1)
    assert torch.all(error <= largest / 127 / 2 + 1e-9)
    assert error[1] < 1e-5  # the small channel was not rounded on the large channels' grid
    assert torch.equal(restored["conv.weight"][2], torch.zeros(3, 3, 3))
    assert torch.allclose(restored["classifier.weight"], original["classifier.weight"], rtol=1e-3, atol=1e-4)


def test_float32_storage_is_the_identity_and_float16_halves_floats():
    original = state_dict_with_awkward_channels()
    assert all(torch.equal(unpack_state_dict(pack_state_dict(original, "float32"))[k], v) for k, v in original.items())
    half = pack_state_dict(original, "float16")
    assert half["conv.weight"].dtype == torch.float16 and SCALE_SUFFIX not in "".join(half)
    assert unpack_state_dict(half)["conv.weight"].dtype == torch.float32


def test_unknown_storage_and_inconsistent_int8_files_are_refused():
    original = state_dict_with_awkward_channels()
    with pytest.raises(ValueError, match="unknown storage dtype 'int4'"):
        pack_state_dict(original, "int4")
    packed = pack_state_dict(original, "int8")
    scale = packed.pop("conv.weight" + SCALE_SUFFIX)
    with pytest.raises(ValueError, match="has no '.int8_scale' scale"):
        unpack_state_dict(packed)
    with pytest.raises(ValueError, match="no tensor it scales"):
        unpack_state_dict({"conv.weight" + SCALE_SUFFIX: scale})
