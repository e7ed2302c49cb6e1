"""adapter_names from several threads of one process on one LoraModel (issue 18 item 7): each call's
names reach its own layers and modules_to_save copies only, so concurrent calls (mixed batches, or a
call without names beside one with names) give exactly what each gives alone; and the activation
checkpointing refusal still sees a mixed training call of its own thread."""
import threading

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fused_lora import LoraConfig, get_lora_model

NAMES = {"a": ["other", "default", "__base__", "other"], "b": ["default", "__base__", "other", "default"]}


class Paused(nn.Module):
    """Two adapted layers and a head, with a point between the layers where the calls of several
    threads can be made to meet (so each has set up its call before any goes on)."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 8)
        self.meet = None  # a threading.Barrier while the test wants the threads to meet
        self.checkpointed = None  # use_reentrant for activation checkpointing of `up` (recomputed in backward)

    def forward(self, x):
        h = torch.relu(self.up(x) if self.checkpointed is None else
                       checkpoint(self.up, x, use_reentrant=self.checkpointed))
        if self.meet is not None:
            self.meet.wait()
        return self.head(self.down(h))


def two_adapters():
    torch.manual_seed(0)
    lm = get_lora_model(Paused(), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False,
                                             modules_to_save=["head"]))
    with torch.no_grad():
        lm.model.head.trainable.weight.mul_(1.5)  # the first adapter's copy differs from the original
    lm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False))
    return lm.eval()


def run_together(lm, calls):
    """Run each call (a function of nothing) in its own thread, all meeting inside the model's forward;
    returns their results in order (re-raising a thread's error)."""
    results, errors = [None] * len(calls), []
    lm.model.meet = threading.Barrier(len(calls), timeout=30)

    def run(i):
        try:
            results[i] = calls[i]()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            errors.append(err)
            lm.model.meet.abort()  # the others must not wait for this one

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        lm.model.meet = None
    if errors:
        raise errors[0]
    return results


@torch.no_grad()
def test_concurrent_mixed_batch_calls_each_get_their_own_names():
    """Issue 18 item 7: the names were an attribute of each layer for the length of the call, so two
    calls in flight at once read each other's names (and the first to end cleared the other's): each
    thread's output must equal that call alone, mixed batches and a call without names alike."""
    lm = two_adapters()
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    alone = {k: lm(x, adapter_names=names) for k, names in NAMES.items()}
    alone["none"] = lm(x)
    assert not torch.allclose(alone["a"], alone["b"])  # the calls differ: a mix-up can show
    calls = [lambda: lm(x, adapter_names=NAMES["a"]), lambda: lm(x, adapter_names=NAMES["b"]), lambda: lm(x)]
    for _ in range(3):
        got = run_together(lm, calls)
        for out, key in zip(got, ("a", "b", "none")):
            torch.testing.assert_close(out, alone[key], rtol=0, atol=0, msg=key)
    assert lm.model.head.sample_uses_trainable is None  # nothing of a call is left behind


@torch.no_grad()
def test_many_threads_calling_one_model_match_the_calls_alone():
    """Issue 18 item 7, without orchestration: 4 threads x 12 calls of one model with random name
    lists (and none), every output equal to the same call made alone."""
    lm = two_adapters()
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    pool = ["default", "other", "__base__"]
    lists = [[pool[i] for i in torch.randint(0, 3, (4,), generator=g).tolist()] for _ in range(6)] + [None]
    alone = [lm(x) if names is None else lm(x, adapter_names=names) for names in lists]
    wrong = []

    def work(seed):
        order = torch.randint(0, len(lists), (12,), generator=torch.Generator().manual_seed(seed)).tolist()
        for i in order:
            out = lm(x) if lists[i] is None else lm(x, adapter_names=lists[i])
            if not torch.equal(out, alone[i]):
                wrong.append(lists[i])

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not wrong, f"{len(wrong)} of 48 outputs differ from the call alone, e.g. for {wrong[0]}"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_refusal_is_not_cleared_by_another_threads_call(use_reentrant):
    """Issue 18 item 7 (the activation checkpointing refusal): a mixed training call under checkpointing
    must raise in backward even when another thread ran the model without names between its forward
    and its backward (a per-layer mark that the last forward overwrote would have been cleared, and
    the recomputation would silently have used the active adapter for every sample; non-reentrant
    checkpointing then failed with torch's unrelated count of saved tensors)."""
    lm = two_adapters().train()
    lm.set_requires_grad(["default", "other"])
    lm.model.checkpointed = use_reentrant
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with pytest.raises(RuntimeError, match="checkpointing recomputes this layer in backward without the adapter_names"):
        lm(x, adapter_names=NAMES["a"]).square().sum().backward()  # the refusal, one thread
    y = lm(x, adapter_names=NAMES["a"])
    other = threading.Thread(target=lambda: lm(x))  # a training call without names, in another thread
    other.start()
    other.join(timeout=60)
    with pytest.raises(RuntimeError, match="checkpointing recomputes this layer in backward without the adapter_names"):
        y.square().sum().backward()
