"""The KV cache on a GPU: exact freeze/thaw through pinned staging, and importance scoring with flash attention.

Every test here skips unless llama.cpp was built with a GPU backend (CI is CPU-only; see docs/gpu.md for
how these ran on an H100). Import ``llama_cpp`` before NumPy when running them (a CUDA build segfaulted
loading a model otherwise): ``python -c "import llama_cpp, pytest; pytest.main(['tests/test_gpu.py'])"``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scoring import observed_scores, rank_overlap

from asrkf_edge import Engine, llama
from asrkf_edge.importance import Importance
from asrkf_edge.policies import make_policy


def _has_gpu() -> bool:
    try:
        return bool(llama.gpu_devices())
    except Exception:  # no llama.cpp ggml bindings at all
        return False


pytestmark = [pytest.mark.real, pytest.mark.skipif(not _has_gpu(), reason="llama.cpp has no GPU backend here")]

TEXT = (
    "The history of the printing press begins in the fifteenth century. Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden screw press, and within fifty years printing shops had opened in "
    "more than two hundred European towns. Books became cheaper, literacy spread, and scholars could compare "
    "identical copies of a text for the first time. "
)
PASSKEY = "The grass is green. The sky is blue. The pass key is 4242. Remember it. Here we go, there and back again. "


@pytest.fixture(scope="module", params=[False, True], ids=["fa-off", "fa-on"])
def gpu(request, real_path):
    with Engine.load(real_path, n_gpu_layers=-1, flash_attn=request.param) as eng:
        yield eng


def _probe(sess, tokens):
    return np.stack([sess.eval([t]) for t in tokens])


def test_pinned_staging_is_used(gpu):
    assert llama.pinned_available()
    with gpu.session(512) as s:
        s.eval(gpu.tokenize(TEXT)[:60])
        s.ctx.seq_cp(0, 1, 10, 40)
        a = s.ctx.state_get(1)
        b = s.ctx.state_get(1)  # ``a`` is alive: a second buffer, same bytes
        assert a.ctypes.data != b.ctypes.data and np.array_equal(a, b)
        del a, b
        c = s.ctx.state_get(1)
        addr = c.ctypes.data
        del c
        assert s.ctx.state_get(1).ctypes.data == addr  # reused once nothing holds it


def test_thaw_on_gpu_is_exact(gpu):
    """Freeze 400 of 1,100 tokens from VRAM to the host store, thaw them: logits as if never frozen."""
    doc = gpu.tokenize(TEXT * 20)[:1200]
    base, tail = doc[:1100], doc[1100:1108]
    with gpu.session(2048) as ref:
        ref.eval(base)
        want = _probe(ref, tail)
    with gpu.session(2048) as s:
        s.eval(base)
        assert s.freeze(200, 600) == 400
        assert s.kv_stats().frozen_tokens == 400
        frozen = s.eval(tail[:1])
        assert np.abs(frozen - want[0]).max() > 0.01  # the range really left attention (0.08 on random weights)
        s.rewind(1)
        assert s.thaw(200, 600) == 400
        got = _probe(s, tail)
    assert np.abs(got - want).max() <= 1e-6


def test_bounded_cache_on_gpu_reads_past_its_size(gpu):
    """A 512-cell cache on the GPU reads 1,500 tokens by freezing between chunks, and thaws on demand."""
    doc = gpu.tokenize(TEXT * 30)[:1500]
    with gpu.session(512) as s:
        s.eval(doc)
        st = s.kv_stats()
        assert st.active_tokens <= 512 and st.frozen_tokens == 1500 - st.active_tokens
        back = s.thaw(100, 300)
        assert back > 0 and s.kv_stats().active_tokens <= 512
        assert np.isfinite(s.eval(doc[:1])).all()


def test_flash_attention_scoring_on_gpu(real_path):
    """Flash attention on the GPU (no softmax node): host attention from captured Q and mirrored keys must
    rank tokens like the captured softmax of the same model with flash attention off."""
    scores = []
    for fa in (False, True):
        with Engine.load(real_path, n_gpu_layers=-1, flash_attn=fa) as eng:
            toks = eng.tokenize(PASSKEY * 12)[:400]
            imp = Importance(eng.model, (3, 9, 15, 21, 27), window=16, flash_attn=fa)
            scores.append(observed_scores(eng.model, imp, toks, 360))
    off, on = scores
    assert np.isfinite(on).all() and on.max() > 0
    assert np.corrcoef(off, on)[0, 1] > 0.99
    assert rank_overlap(off, on) >= 36


def test_asrkf_runs_with_flash_attention_on_gpu(real_path):
    """The asrkf policy under a 35% budget on the GPU with flash attention: freezes, stays in budget, decodes."""
    from asrkf_edge.runner import budget_cells

    with Engine.load(real_path, n_gpu_layers=-1, flash_attn=True) as eng:
        toks = eng.tokenize(TEXT * 40)[:2000]
        from asrkf_edge.policies import make_policy

        cells = budget_cells(make_policy("asrkf"), 0.35, len(toks), 32)
        with eng.runner("asrkf", cells) as run:
            run.prefill(toks)
            for _ in range(32):
                run.decode(int(np.argmax(run.logits())))
            st = run.stats()
    assert st.active_tokens_peak <= cells
    assert st.frozen_tokens > 0 and st.freeze_events > 0
    assert st.logical_tokens == 2032


def test_recall_with_every_layer_on_the_cpu_of_a_gpu_build(tiny_path):
    """With the weights in host memory (``--gpu-layers 0``, the command line's default) a GPU build still sent a
    prompt's ops to the GPU (llama.cpp's op_offload), and recall, reading the queries there as host memory, crashed
    the process; recall's contexts keep every op on the CPU."""
    with Engine.load(tiny_path) as eng, eng.runner(make_policy("asrkf-recall"), 256) as run:  # chunks of 110 tokens
        run.prefill(eng.tokenize("the sky is blue and the grass is green " * 60))
        for _ in range(4):
            run.decode(int(np.argmax(run.logits())))
        assert run.session.recall is not None and run.session.recall.rows > 0
