"""core.gathered: a remembered gather is saved as (source, index) and gathered again; anything else as itself."""
import weakref

import pytest
import torch

from fused_lora.core import gathered


def test_a_remembered_gather_is_kept_as_its_source_and_index():
    source = torch.randn(5, 3)
    index = torch.tensor([4, 0, 0, 2])
    x = source[index]
    gathered.remember(x, source, index)
    kept, kept_index = gathered.kept_form(x)
    assert kept is source and kept_index is index
    assert torch.equal(gathered.regather(kept, kept_index), x)


def test_a_tensor_not_remembered_is_kept_as_itself():
    x = torch.randn(4, 3)
    gathered.remember(torch.randn(4, 3)[torch.tensor([0, 1, 2, 3])], torch.randn(4, 3), torch.arange(4))
    kept, index = gathered.kept_form(x)
    assert kept is x and index is None
    assert gathered.regather(kept, index) is x


def test_the_record_keeps_nothing_alive():
    """Remembering holds neither x nor, once x is gone, its source (a forward without backward leaks nothing)."""
    source, index = torch.randn(5, 3), torch.tensor([1, 1, 3])
    x = source[index]
    gathered.remember(x, source, index)
    x_ref, source_ref = weakref.ref(x), weakref.ref(source)
    del x, source
    assert x_ref() is None and source_ref() is None


@pytest.mark.parametrize("index, source", [(torch.tensor([0, 1]), torch.randn(5, 3)),  # 2 rows for x's 3
                                           (torch.tensor([0, 1, 2]), torch.randn(5, 4)),  # other columns
                                           (torch.tensor([[0, 1, 2]]), torch.randn(5, 3))])  # a 2-D index
def test_rows_that_cannot_be_the_gather_are_refused(index, source):
    with pytest.raises(ValueError, match="is not rows of source"):
        gathered.remember(torch.randn(3, 3), source, index)


@pytest.mark.parametrize("written", ["x", "source"])
def test_a_write_after_remembering_keeps_x_itself(written):
    """A write to x or to its source between the gather and the op's save (a forward pre-hook, say) breaks
    x == source[index]: the op then keeps x itself, never rows that differ from what the forward read."""
    source, index = torch.randn(5, 3), torch.tensor([4, 0, 0, 2])
    x = source[index]
    gathered.remember(x, source, index)
    (x if written == "x" else source).mul_(2.0)
    kept, kept_index = gathered.kept_form(x)
    assert kept is x and kept_index is None
