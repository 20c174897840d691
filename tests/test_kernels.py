import os
import platform
import shutil
import signal
import time

import pytest
import torch

from aligna import kernels
from aligna.kernels import log_softmax_


def test_the_c_kernel_is_built_where_a_compiler_is():
    """pip install compiles aligna/_kernels.c; the extension is optional, so a failed build would
    only show as slower decoding: here it fails a test."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: aligna runs on torch's operators")
    assert kernels._kernels is not None
    if platform.machine() == "x86_64":  # the vectorized path runs wherever AVX2 and FMA do
        flags = open("/proc/cpuinfo").read()
        assert kernels.native() == (" avx2" in flags and " fma" in flags)


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (5, 16), (4, 17), (2, 33), (6, 7743)])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_log_softmax_equals_torch(code, rows, cols, scale):
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g) * scale
    add = torch.randn(rows, generator=g)
    expected = torch.log_softmax(x, -1) + add[:, None]
    out = log_softmax_(x.clone(), add)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5 * scale)
    torch.testing.assert_close(log_softmax_(x.clone()), torch.log_softmax(x, -1), rtol=1e-6, atol=1e-5 * scale)


def test_log_softmax_works_in_place_and_keeps_minus_infinity(code):
    x = torch.randn(4, 40)
    x[1, :30] = float("-inf")  # blocked tokens stay impossible
    x[2, 5] = 80.0  # one dominant token: log-probability ~0, the rest very negative
    expected = torch.log_softmax(x, -1)
    out = log_softmax_(x)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(torch.isneginf(out), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-6, atol=1e-5)
    add = torch.tensor([0.0, float("-inf"), 1.0, 2.0])  # a dead beam: all its candidates -inf
    assert bool(torch.isneginf(log_softmax_(torch.randn(4, 9), add)[1]).all())


@pytest.mark.parametrize("cols", [7, 16, 17])
def test_a_nan_logit_makes_its_row_nan_and_a_row_of_minus_infinity_stays_so(code, cols):
    """The vectorized exp clamped a NaN to exp(-87) (max_ps's operand order), so a broken model
    gave finite log-probabilities on AVX2 machines and NaN elsewhere; a row of -inf came out
    -inf or NaN by its length."""
    x = torch.zeros(3, cols)
    x[0, 3], x[0, 5] = float("nan"), 2.0  # in a vector lane where there is one
    x[1] = float("-inf")  # nothing possible: every log-probability -inf (torch: nan)
    out = log_softmax_(x.clone())
    assert bool(out[0].isnan().all()) and bool(out[1].isneginf().all())
    torch.testing.assert_close(out[2], torch.log_softmax(x[2], -1))
    _, values, _ = kernels.log_softmax_top_(x[1:].clone(), torch.zeros(2), 1, 2)
    assert bool(values[0].isneginf().all()) and bool(values[1].isfinite().all())


@pytest.mark.parametrize("case", ["bf16", "strided", "grad"])
def test_other_tensors_take_torch(case):
    """What the kernel does not take (other dtypes, non-contiguous rows, autograd) is computed
    by torch's operators, and the input is left alone."""
    x = torch.randn(3, 10)
    if case == "bf16":
        x = x.bfloat16()
    elif case == "strided":
        x = torch.randn(10, 3).t()
    else:
        x.requires_grad_(True)
    before = x.detach().clone()
    add = torch.randn(3)
    out = log_softmax_(x, add)
    assert out.dtype == torch.float32 and torch.equal(x.detach(), before)
    torch.testing.assert_close(out.detach(), torch.log_softmax(before.float(), -1) + add[:, None])


@pytest.fixture(params=["vector", "portable"])
def code(request, monkeypatch):
    """Both versions of the kernel: the AVX2 one where it runs, and the portable C (which aligna
    leaves to torch's operators outside the tests)."""
    if kernels._kernels is None:
        pytest.skip("the C kernel is not built")
    if request.param == "vector" and not kernels.native():
        pytest.skip("no AVX2 here")
    monkeypatch.setattr(kernels, "USE", True)
    kernels._kernels.set_portable(request.param == "portable")
    yield request.param
    kernels._kernels.set_portable(False)


@pytest.mark.parametrize("rows, group, cols, n", [(10, 5, 7743, 10), (6, 3, 37, 6), (4, 1, 9, 3), (2, 2, 3, 6)])
def test_the_best_candidates_come_with_the_log_softmax(code, rows, group, cols, n):
    """log_softmax_top_ = log_softmax_ and then top_k over each group of rows: the same values,
    positions that hold them, none twice, best first."""
    g = torch.Generator().manual_seed(rows * cols + n)
    x = torch.randn(rows, cols, generator=g) * 3
    add = torch.randn(rows, generator=g)
    add[1] = float("-inf")  # a dead beam: all its candidates -inf
    x[0, : cols // 2] = x[0, : cols // 2].round()  # ties
    expected = log_softmax_(x.clone(), add)
    out, values, positions = kernels.log_softmax_top_(x, add, group, n)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    flat = out.view(rows // group, group * cols)
    best, _ = flat.topk(n, dim=1)
    assert torch.equal(values, best)
    assert torch.equal(flat.gather(1, positions), values)
    assert all(len(set(row)) == n for row in positions.tolist())


def test_best_candidates_only_where_the_kernel_takes_the_tensors():
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    assert kernels.log_softmax_top_(x, torch.zeros(4), 2, 4) is None
    assert kernels.log_softmax_top_(torch.randn(4, 10), torch.zeros(4), 3, 4) is None  # rows not in whole groups


@pytest.fixture
def threads(monkeypatch):
    """torch at 3 threads and the kernels splitting work of 4 rows a thread: each call below is
    cut into parts that run in the kernels' thread pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    monkeypatch.setattr(kernels, "MIN_ROWS_PER_THREAD", 4)
    yield 3
    torch.set_num_threads(before)


def test_rows_split_among_threads_give_what_one_thread_gives(code, threads, monkeypatch):
    """Each row is computed alone, so the parts (whole groups: a beam's rows stay together, with
    their best candidates) give the same bits as one pass; a part's error reaches the caller."""
    g = torch.Generator().manual_seed(11)
    x, add = torch.randn(30, 37, generator=g) * 3, torch.randn(30, generator=g)
    targets = torch.randint(1, 37, (30,), generator=g)
    targets[::4] = 0
    split = (kernels.log_softmax_(x.clone(), add.clone()), kernels.log_softmax_top_(x.clone(), add, 5, 7),
             kernels.cross_entropy(x, targets, 0.1, 0))  # fmt: skip
    monkeypatch.setattr(kernels, "MIN_ROWS_PER_THREAD", 1000)  # one part
    whole = (kernels.log_softmax_(x.clone(), add.clone()), kernels.log_softmax_top_(x.clone(), add, 5, 7),
             kernels.cross_entropy(x, targets, 0.1, 0))  # fmt: skip
    assert torch.equal(split[0], whole[0])
    assert all(torch.equal(a, b) for a, b in zip(split[1], whole[1], strict=True))
    assert torch.equal(split[2][1], whole[2][1]) and torch.allclose(split[2][0], whole[2][0], rtol=1e-6)
    monkeypatch.setattr(kernels, "MIN_ROWS_PER_THREAD", 4)
    targets[25] = 99  # in the last part
    with pytest.raises(IndexError, match="target 99 is out of range for 37 classes"):
        kernels.cross_entropy(x, targets, 0.1, 0)


def test_callers_in_several_threads_share_the_pool(code, threads, monkeypatch):
    """A server decodes requests in several threads: their calls share the kernels' pool, which
    grows (a call of few rows makes a small one, a longer one a bigger one) while others use it."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(kernels, "_pool", None)
    g = torch.Generator().manual_seed(3)
    cases = [(torch.randn(rows, 29, generator=g), torch.randint(1, 29, (rows,), generator=g)) for rows in (8, 12, 40)]
    expected = [torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1, reduction="sum") for x, t in cases]
    with ThreadPoolExecutor(6) as callers:
        results = list(callers.map(lambda i: kernels.cross_entropy(*cases[i % 3], 0.1, 0)[0], range(60)))
    for i, loss in enumerate(results):
        torch.testing.assert_close(loss, expected[i % 3], rtol=1e-5, atol=1e-4)


def test_the_thread_pool_is_remade_in_a_forked_child(code, threads):
    """A forked process inherits the pool but not its threads: work sent to it would wait forever."""
    kernels.cross_entropy(torch.randn(40, 9), torch.ones(40, dtype=torch.long), 0.1, 0)  # the parent's pool
    assert kernels._pool is not None
    pid = os.fork()
    if pid == 0:  # the child: exits 0 only if the split call returns
        exit_code = 1
        try:
            kernels.cross_entropy(torch.randn(40, 9), torch.ones(40, dtype=torch.long), 0.1, 0)
            exit_code = 0
        finally:
            os._exit(exit_code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the forked child's kernel call did not return")


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_and_its_gradient_equal_torch(code, eps):
    """The training loss's kernel: F.cross_entropy (summed, padding ignored, label smoothing)
    and its gradient, in one pass a row."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(13, 37, generator=g) * 4
    targets = torch.randint(1, 37, (13,), generator=g)
    targets[3] = 0  # padding: no loss, no gradient
    loss, grad = kernels.cross_entropy(logits, targets, eps, 0)
    x = logits.clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(x, targets, ignore_index=0, label_smoothing=eps, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6)
    assert not bool(grad[3].any())


def test_cross_entropy_refuses_a_target_outside_the_vocabulary(code):
    with pytest.raises(IndexError, match="target 9 is out of range for 5 classes"):
        kernels.cross_entropy(torch.randn(2, 5), torch.tensor([1, 9]), 0.1, 0)
    with pytest.raises(ValueError, match=r"\(5,\) targets on cpu for 10 rows"):  # read past its end before
        kernels.cross_entropy(torch.randn(10, 5), torch.tensor([1, 2, 3, 4, 1]), 0.1, 0)


def test_long_rows_are_summed_without_bias(code):
    """A 32,000-word vocabulary: the softmax's sum over a row in float lanes of V/8 terms each came
    out ~1e-5 low, so every gradient row summed to ~1e-5, not 0. Now to float rounding."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 32000, generator=g) * 3
    targets = torch.randint(1, 32000, (64,), generator=g)
    loss, grad = kernels.cross_entropy(logits, targets, 0.1, 0)
    assert float(grad.double().sum(1).abs().max()) < 1e-6
    expected = torch.nn.functional.cross_entropy(logits.double(), targets, label_smoothing=0.1, reduction="sum")
    assert abs(float(loss) - float(expected)) < 1e-6 * float(expected)
    out = log_softmax_(logits.clone(), torch.zeros(64))
    assert float((out.double().exp().sum(1) - 1).abs().max()) < 1e-6


def test_cross_entropy_without_smoothing_ignores_a_minus_inf_logit(code):
    """eps 0: no smoothing term, so a -inf logit elsewhere in the row leaves the loss finite, as
    torch's (0 * -inf was nan, and the update would be skipped as non-finite)."""
    logits = torch.randn(3, 20)
    logits[:, 5] = float("-inf")
    targets = torch.tensor([1, 2, 3])
    loss, _ = kernels.cross_entropy(logits, targets, 0.0, 0)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    logits[1, 7] = float("nan")  # a NaN logit: a NaN loss, as torch's (the trainer then skips the update)
    for eps in (0.0, 0.1):
        assert kernels.cross_entropy(logits, targets, eps, 0)[0].isnan()


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_masks_keep_each_value_with_chance_one_minus_p(code, p):
    """Kept values are 1 / (1 - p), the rest 0; the share kept, of single positions and of
    neighbouring pairs, is (1 - p) and (1 - p)^2 to sampling error (a hash that correlated
    neighbours, lanes or positions 8 apart would miss the pairs' share)."""
    torch.manual_seed(int(p * 10))
    x = torch.empty(1_000_003)  # not a multiple of 8: the vector loop's tail too
    mask = kernels.dropout_mask(x, p)
    kept = mask != 0
    assert mask.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    sd = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(float(kept.float().mean()) - (1 - p)) < 5 * sd
    for gap in (1, 7, 8, 64):
        both = float((kept[gap:] & kept[:-gap]).float().mean())
        assert abs(both - (1 - p) ** 2) < 5 * sd, gap
    lanes = kept[: 1_000_000].view(-1, 8).float().mean(0)  # each of the 8 lanes of the vector loop
    assert float((lanes - (1 - p)).abs().max()) < 5 * (p * (1 - p) / 125_000) ** 0.5


def test_dropout_masks_follow_torchs_generator_and_both_codes_agree():
    """The seed comes from torch's generator: the same seed gives the same masks, the next call
    another mask, unrelated to the first (no shifted copy of it either); the AVX2 and portable
    loops give the same bits."""
    if kernels._kernels is None or not kernels.native():
        pytest.skip("the vectorized C kernel is not built or does not run here")
    x = torch.empty(3, 1001)
    masks = {}
    for code in ("vector", "portable"):
        kernels._kernels.set_portable(code == "portable")
        try:
            torch.manual_seed(7)
            masks[code] = [kernels.dropout_mask(x, 0.5) for _ in range(2)]
        finally:
            kernels._kernels.set_portable(False)
    assert all(torch.equal(a, b) for a, b in zip(masks["vector"], masks["portable"]))
    assert not torch.equal(*masks["vector"])
    # Seeds whose low halves differ by 5 steps of the Weyl sequence: hashed once, the second mask
    # would be the first shifted by 5 positions; the high half, hashed in too, makes them unrelated.
    raw = {}
    for hi in (1, 2):
        raw[hi] = torch.empty(4096)
        low = (1234 + 5 * 0x9E3779B9 * (hi - 1)) % 2**32
        kernels._kernels.dropout_mask(raw[hi].data_ptr(), 4096, 2**31, 2.0, hi << 32 | low)
    first, second = raw[1] != 0, raw[2] != 0
    agree = [float((first[k:] == second[: 4096 - k]).float().mean()) for k in range(0, 64)]
    assert max(agree) < 0.56 and min(agree) > 0.44, agree  # ~0.5 at every shift (4,000 pairs: 3.5 sd)


def test_dropout_masks_only_where_the_kernel_takes_the_tensor(monkeypatch):
    monkeypatch.setattr(kernels, "USE", True)
    if kernels._kernels is None:
        pytest.skip("the C kernel is not built")
    assert kernels.dropout_mask(torch.empty(4, dtype=torch.float16), 0.3) is None  # torch draws those
    bf16 = kernels.dropout_mask(torch.empty(4000, dtype=torch.bfloat16), 0.5)  # autocast's activations: cast
    assert bf16.dtype == torch.bfloat16 and set(bf16.unique().tolist()) == {0.0, 2.0}
    assert kernels.dropout_mask(torch.empty(4), 0.0) is None and kernels.dropout_mask(torch.empty(4), 1.0) is None
    assert kernels.dropout_mask(torch.empty(2, 0, 3), 0.3).shape == (2, 0, 3)
    monkeypatch.setattr(kernels, "USE", False)
    assert kernels.dropout_mask(torch.empty(4), 0.3) is None
