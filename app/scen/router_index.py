"""Which edits may fire on a prompt, found without reading every neuron.

An edit's activation is ``min(s, r)`` (see ``routed.Router``), so it can route a
prompt only where its subject factor ``s`` exceeds theta at some token of the
user's text: where the subject logit ``k . w + b`` of that token's key ``k``
(whitened, unit length) passes ``logit(theta) + subject_margin``. Finding every
such edit is a range search by inner product, queries ``[k, 1]`` against rows
``[w, b]``. With many thousands of live edits the router asks this index for
those candidates and computes both factors exactly on them alone, instead of
reading two (E, h) matrices per prompt.

The index is an inverted file (faiss ``IndexIVFScalarQuantizer``): the rows are
clustered, each prompt token scans only the rows of its ``probes`` nearest
clusters, stored as 8-bit codes (``QT_8bit``: a range per dimension, set here rather than
trained on a sample, see ``_ranges``). It is approximate in two ways, both measured in
``bench/routing.py``: an edit whose row sits in a cluster the token does not
probe is missed, and the 8-bit codes shift scores a little (hence ``slack``: rows
scoring up to that much below the bound are returned too, and the exact second
stage drops them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.scen.blas import name_openblas_core

name_openblas_core()
import faiss  # noqa: E402  (after the core is named: OpenBLAS reads it when loaded)

# faiss' scalar-quantizer kernels vectorise only dimensions that are a multiple of this.
_ALIGN = 16
# QT_8bit_direct (codes read as their own values, which would spare decoding them) is not
# used: faiss 1.15's vectorised inner product for it is wrong with AVX2 at every multiple of
# 16 dimensions and with AVX-512 at every multiple of 32 (test_router_index checks the scores).


@dataclass(frozen=True)
class IndexSettings:
    # Below this many live neurons the router reads them all: exact, and cheaper than the
    # index's fixed cost (bench/routing.py measures the crossover).
    min_neurons: int = 4096
    # Clusters: about ``rows_per_list`` rows each, within [64, 4096] (and no more than rows).
    # At 100,000 real-key neurons 128 rows (781 clusters) kept recall where 64 had it (0.988
    # against 0.986 of 800 probes routed as the dense product routes them) with a third of the
    # build time and less to read per prompt; 256 with 4 or 8 probes lost recall (0.956, 0.971).
    rows_per_list: int = 128
    # Clusters each prompt token scans: recall against time.
    probes: int = 16
    # Of those, only the clusters whose mean direction the token's key meets at this cosine or
    # more: a token far from every cluster scans few or none. At 100,000 real-key neurons 0.1
    # left 70 % of the rows to scan (a batch of 8 in 26 ms against 32; batch 1 unchanged at
    # about 5.7 ms) with recall unchanged (0.9875), but at 10,000 it missed 3 more of 800 probes
    # (0.9937); 0.15 scanned 47 % (5.2 ms, 23 ms; recall 0.985). None: all ``probes``.
    probe_floor: float | None = None
    # Rows scoring up to this many logits under the bound are candidates too: 8-bit codes
    # misplace a score by far less than this, and a false candidate only costs its exact check.
    slack: float = 0.5
    # k-means on at most this many rows per cluster, for this many rounds: build time (100,000
    # rows: about 2 s on 2 CPU cores).
    train_rows_per_list: int = 8
    train_rounds: int = 8
    # Rebuilt (clusters retrained) once the live set has grown or shrunk by this factor since
    # the last build: clusters fitted to few rows get long lists as rows flow in.
    regrow: float = 2.0
    seed: int = 0

    def lists_for(self, n: int) -> int:
        return int(max(1, min(n, 4096, max(64, round(n / self.rows_per_list)))))


DEFAULT = IndexSettings()


class SubjectIndex:
    """An inverted file of subject rows ``[w, b]`` under int64 labels (faiss, CPU)."""

    def __init__(self, h: int, settings: IndexSettings):
        self.h = h
        self.d = _ALIGN * math.ceil((h + 1) / _ALIGN)  # the row, its bias, zeros
        self.settings = settings
        self._ivf: faiss.IndexIVFScalarQuantizer | None = None
        self._centroids = torch.zeros(0, self.d)  # (d, nlist): the clusters' unit mean directions

    def build(self, w: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> None:
        """Cluster and store the rows ``w`` (N, h), ``b`` (N,) under ``labels`` (N,)."""
        s = self.settings
        n = len(w)
        nlist = s.lists_for(n)
        vectors = self._rows(w, b)
        quantizer = faiss.IndexFlatIP(self.d)
        ivf = faiss.IndexIVFScalarQuantizer(
            quantizer, self.d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
        )
        # Inner-product clustering with free centroid norms lets a few long centroids take
        # every row; unit centroids cluster by direction, which is what a key matches.
        ivf.cp.spherical = True
        ivf.cp.niter = s.train_rounds
        ivf.cp.seed = s.seed
        ivf.cp.max_points_per_centroid = s.train_rows_per_list
        ivf.cp.min_points_per_centroid = 1
        rng = np.random.default_rng(s.seed)
        sample = vectors if n <= nlist * s.train_rows_per_list else vectors[
            np.sort(rng.choice(n, nlist * s.train_rows_per_list, replace=False))]
        # Clusters by the rows' directions alone: with the bias in, a centroid's share of the
        # (all but equal) biases grows as its rows spread, and tight clusters would outrank,
        # for every key, the one that holds its match.
        sample = sample.copy()
        sample[:, self.h] = 0.0
        ivf.train(sample)
        # faiss trained the codes' ranges on that sample: they are replaced by ranges of every
        # row, widened for rows still to come.
        faiss.copy_array_to_vector(np.concatenate(self._ranges(vectors)), ivf.sq.trained)
        ivf.nprobe = min(s.probes, nlist)
        # Threads share one token's clusters rather than taking tokens each: a prompt has a handful
        # of tokens, and their clusters hold very different numbers of rows.
        ivf.parallel_mode = 1
        self._ivf = ivf
        self._add(vectors, labels)
        # Choosing a prompt's clusters is one small product: torch's matmul and topk do it in
        # about a third of the time of the flat quantizer's search at 20 tokens and 781 clusters.
        self._centroids = torch.from_numpy(quantizer.reconstruct_n(0, nlist)).T.contiguous()

    @property
    def built(self) -> bool:
        return self._ivf is not None

    def __len__(self) -> int:
        return 0 if self._ivf is None else int(self._ivf.ntotal)

    def add(self, w: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> None:
        assert self._ivf is not None, "build the index first"
        if len(w):
            self._add(self._rows(w, b), labels)

    def _add(self, vectors: np.ndarray, labels: torch.Tensor) -> None:
        assert self._ivf is not None and self._ivf.quantizer is not None
        # Each row joins the cluster its own vector is nearest to: its codes live in another space.
        _, lists = self._ivf.quantizer.search(vectors, 1)
        ids = self._labels(labels)
        # Called directly, not through faiss.contrib's add_preassigned: that drops its last
        # reference to the ids array before faiss reads it.
        self._ivf.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists.ravel()))

    def remove(self, labels: torch.Tensor) -> None:
        if self._ivf is not None and len(labels):
            self._ivf.remove_ids(faiss.IDSelectorBatch(self._labels(labels)))

    def search(self, keys: torch.Tensor, floor: float) -> torch.Tensor:
        """Labels (M,) of rows whose score ``[k, 1] . [w, b]`` may exceed ``floor`` for some
        key of ``keys`` (Q, h), each label once, sorted."""
        assert self._ivf is not None, "build the index first"
        if not len(keys):
            return torch.zeros(0, dtype=torch.long)
        s = self.settings
        queries = torch.zeros(len(keys), self.d)
        queries[:, : self.h] = keys.detach().float().cpu()
        queries[:, self.h] = 1.0
        near, lists = (queries @ self._centroids).topk(self._ivf.nprobe, dim=1)  # (Q, probes) each
        if s.probe_floor is not None:
            lists[near < s.probe_floor] = -1  # faiss skips list -1
        # faiss' Python wrapper of the call, not the C++ signature its type stubs describe.
        ivf: Any = self._ivf
        _, _, found = ivf.range_search_preassigned(queries.numpy(), floor - s.slack, lists.numpy(), near.numpy())
        return torch.from_numpy(np.unique(found))

    def labels(self) -> torch.Tensor:
        """Every stored label, sorted (for checks: the index holds exactly the live rows)."""
        if self._ivf is None:
            return torch.zeros(0, dtype=torch.long)
        lists = self._ivf.invlists
        assert lists is not None
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(lists.nlist)]
        return torch.from_numpy(np.sort(np.concatenate(parts))) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        """Memory of the codes, labels and centroids."""
        if self._ivf is None:
            return 0
        ivf = self._ivf
        return int(ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * self.d * 4)

    def _ranges(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 8-bit codes' range per dimension: (lowest, width), each (d,).

        Rows added after the build are coded in these ranges too, so they are twice as wide
        as the rows' (a value outside is clipped), and the bias's is 32 logits wider: edits
        are added one at a time with biases no build saw. Either costs precision that is far
        below ``slack`` (about 0.01 logit on a score)."""
        lo, hi = rows.min(0), rows.max(0)
        span = hi - lo
        lo, span = lo - span / 2, 2 * span
        lo[self.h] -= 16.0
        span[self.h] += 32.0
        return lo.astype(np.float32), np.maximum(span, 1e-6).astype(np.float32)

    def _rows(self, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        rows = np.zeros((len(w), self.d), dtype=np.float32)
        rows[:, : self.h] = w.detach().float().cpu().numpy()
        rows[:, self.h] = b.detach().float().cpu().numpy()
        return rows

    @staticmethod
    def _labels(labels: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(labels.detach().cpu().numpy().astype(np.int64))


class NeuronIndex:
    """The router's index over its neurons' subject factors, kept in step with its slots.

    Every appended neuron gets the next label, so labels rise with the slot and a popped
    slot just drops out: the slot of a label is its rank among the live labels. Rows join
    the index lazily, at the next search (all at once when the index is built: appending
    100,000 neurons one by one costs no index work until then), and leave it on ``pop``.
    """

    def __init__(self, h: int, settings: IndexSettings | None):
        self.settings = settings
        self._h = h
        self._n = 0
        self._next = 0
        self._labels = torch.zeros(0, dtype=torch.long)  # (capacity,) slot -> label
        self._low = torch.zeros(0)  # (capacity,) slot -> the least subject logit any key gives, b - |w|
        self._index = SubjectIndex(h, settings) if settings is not None else None
        self._stored_below = 0  # labels below this are in the index unless popped
        self._built_for = 0  # live rows when the index was last built

    def __getstate__(self) -> dict:
        # faiss objects neither pickle nor deep-copy: a copy rebuilds its index when first asked.
        state = self.__dict__.copy()
        state["_index"] = SubjectIndex(self._h, self.settings) if self.settings is not None else None
        state["_stored_below"] = state["_built_for"] = 0
        return state

    def active(self, n: int) -> bool:
        return self._index is not None and self.settings is not None and n >= self.settings.min_neurons

    def append(self, w: torch.Tensor, b: torch.Tensor) -> None:
        if self._n == len(self._labels):
            capacity = max(16, 2 * self._n)
            self._labels = torch.cat([self._labels, self._labels.new_zeros(capacity - self._n)])
            self._low = torch.cat([self._low, self._low.new_zeros(capacity - self._n)])
        self._labels[self._n] = self._next
        self._low[self._n] = float(b) - float(w.float().norm())
        self._next += 1
        self._n += 1

    def pop(self, slot: int) -> None:
        n = self._n
        label = self._labels[slot].clone()
        self._labels[slot : n - 1] = self._labels[slot + 1 : n].clone()
        self._low[slot : n - 1] = self._low[slot + 1 : n].clone()
        self._n -= 1
        if self._index is not None and int(label) < self._stored_below:
            self._index.remove(label.reshape(1))

    def candidates(self, keys: torch.Tensor, w: torch.Tensor, b: torch.Tensor, floor: float) -> torch.Tensor:
        """Slots (K,) sorted, of the neurons whose subject logit may exceed ``floor`` on some key
        of ``keys`` (Q, h); ``w`` (n, h) and ``b`` (n,): the live rows, for rows not indexed yet."""
        assert self._index is not None, "no index settings"
        self.sync(w, b)
        labels = self._labels[: self._n]
        found = self._index.search(keys, floor)
        slots = torch.searchsorted(labels, found)
        # A row no key can fail (a neuron without a subject factor) is never in a probed
        # cluster by necessity: it is a candidate for every prompt.
        always = (self._low[: self._n] > floor - self._index.settings.slack).nonzero().flatten()
        return torch.cat([slots, always]).unique().to(w.device)

    def sync(self, w: torch.Tensor, b: torch.Tensor) -> None:
        """Bring the index up to the live rows: build it, rebuild it, or add the newest rows."""
        assert self._index is not None and self.settings is not None
        n, grow = self._n, self.settings.regrow
        labels = self._labels[:n]
        if not self._index.built or n > grow * self._built_for or n * grow < self._built_for:
            self._index = SubjectIndex(self._h, self.settings)
            self._index.build(w, b, labels)
            self._built_for = n
        else:
            first = int(torch.searchsorted(labels, torch.tensor(self._stored_below)))
            self._index.add(w[first:], b[first:], labels[first:])
        self._stored_below = self._next

    def stored_labels(self) -> torch.Tensor:
        return self._index.labels() if self._index is not None else torch.zeros(0, dtype=torch.long)

    def live_labels(self) -> torch.Tensor:
        return self._labels[: self._n].clone()

    @property
    def nbytes(self) -> int:
        """Memory of the index and of the per-slot labels."""
        index = self._index.nbytes if self._index is not None else 0
        return index + self._labels.nbytes + self._low.nbytes
