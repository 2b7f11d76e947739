"""Seeded synthetic lifelong dataset, written in the fixed-benchmark folder format plus `evidence`.

World: items have Zipf popularity (rank^-a over a random permutation) and come in small *families*
(`family_size` consecutive ids, one category per family). Each user has a few long-lived interest
categories that recur over the whole history, a drifting current interest that changes every
~`drift_every` events, and popularity noise. Every event draws its category from one of these sources and
its item by popularity within the category.

Hidden rule: a target row (user, pos, item) is positive iff an item of the target's *family* occurs in the
user's history before `pos`. Positives are built from a history event: for a `far_fraction` of them the
family's most recent occurrence lies more than `window` events back (so only a lifelong search sees it);
negatives are items whose family never occurred before `pos`: of the same category where possible (hard
negatives), else by popularity, else uniform over families (long histories cover the popular ones).
`evidence` lists the positions (ascending, the `max_evidence` most recent) of the history events of the
target's family: exactly the events that make the rule fire, empty for negatives.

Label noise (`label_noise` = e): each row's label is the rule's, flipped with probability e, drawn from its
own seeded stream (so e changes labels only, never events, items or evidence). `p_label` is then the exact
probability of label 1 given the full history and the target: 1 - e where the rule fires, e where it does
not; no model can rank rows better, so the AUC of `p_label` on the labels is the ceiling. Without noise the
rule is deterministic and the ceiling is 1.

Generation is vectorised per chunk of whole users (~`chunk_events` events) and streamed to Parquet, so
memory is bounded by the chunk, not the dataset; a single user may have 100,000+ events.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config.data import SyntheticConfig
from recsys.data.layout import remove_parts
from recsys.data.manifest import FILE as MANIFEST
from recsys.data.manifest import write_manifest
from recsys.data.prepare import FORMAT, split_of_events
from recsys.data.schemas import DATASET_EVENTS_SCHEMA, SPLITS, SYNTHETIC_SPLIT_SCHEMA

T0_SECONDS = 1_577_836_800  # 2020-01-01 UTC: start of the synthetic clock
NEG_SAME_CATEGORY_ROUNDS = 16
NEG_ROUNDS = 64
FAR_ROUNDS = 8


@dataclass
class World:
    """The global catalogue: item categories, families and popularity."""

    item_cate: np.ndarray    # [I + 1] int64, 0 for padding
    fam_cate: np.ndarray     # [F] int64
    cum_all: np.ndarray      # [I] cumulative popularity of items 1..I
    by_cate: np.ndarray      # [I] item ids sorted by category
    cum_by_cate: np.ndarray  # [I] cumulative popularity in that order
    cate_lo: np.ndarray      # [C + 1] first index of category c in by_cate
    cate_hi: np.ndarray      # [C + 1] one past its last index
    cate_mass: np.ndarray    # [C + 1] total popularity of each category (0 for padding)

    @property
    def n_items(self) -> int:
        return len(self.item_cate) - 1


def build_world(cfg: SyntheticConfig) -> World:
    rng = np.random.default_rng([cfg.seed, 0])
    n_fam = -(-cfg.n_items // cfg.family_size)
    # Every category gets at least one family; the rest are spread at random.
    fam_cate = np.concatenate([np.arange(1, cfg.n_cates + 1), rng.integers(1, cfg.n_cates + 1, n_fam - cfg.n_cates)])
    fam_cate = rng.permutation(fam_cate)
    item_cate = np.concatenate([[0], fam_cate[np.arange(cfg.n_items) // cfg.family_size]])
    weight = rng.permutation(np.arange(1, cfg.n_items + 1, dtype=np.float64)) ** -cfg.zipf_a
    by_cate = np.argsort(item_cate[1:], kind="stable") + 1
    cum_by_cate = np.cumsum(weight[by_cate - 1])
    counts = np.bincount(item_cate[1:], minlength=cfg.n_cates + 1)
    cate_hi = np.cumsum(counts)
    cate_lo = cate_hi - counts
    cate_mass = np.bincount(item_cate[1:], weights=weight, minlength=cfg.n_cates + 1)
    return World(item_cate, fam_cate, np.cumsum(weight), by_cate, cum_by_cate, cate_lo, cate_hi, cate_mass)


def _draw(cum: np.ndarray, u: np.ndarray, lo: np.ndarray | int = 0, hi: np.ndarray | int | None = None) -> np.ndarray:
    """Inverse-CDF draw of an index in [lo, hi) from cumulative weights `cum`."""
    hi = len(cum) if hi is None else hi
    base = np.where(np.asarray(lo) > 0, cum[np.maximum(np.asarray(lo) - 1, 0)], 0.0)
    target = base + u * (cum[np.asarray(hi) - 1] - base)
    return np.clip(np.searchsorted(cum, target, side="right"), lo, np.asarray(hi) - 1)


def items_in(world: World, cate: np.ndarray, u: np.ndarray) -> np.ndarray:
    """An item of each category, by popularity."""
    return world.by_cate[_draw(world.cum_by_cate, u, world.cate_lo[cate], world.cate_hi[cate])]


def sequence_lengths(cfg: SyntheticConfig) -> np.ndarray:
    e = cfg.events_per_user
    rng = np.random.default_rng([cfg.seed, 1])
    mu = np.log(e.mean) - e.sigma**2 / 2  # so that the (unclipped) mean is e.mean
    return np.clip(np.rint(rng.lognormal(mu, e.sigma, cfg.n_users)), e.min, e.max).astype(np.int64)


def generate_events(world: World, cfg: SyntheticConfig, lengths: np.ndarray, rng: np.random.Generator):
    """(item [N], ts [N]) for users with `lengths`, concatenated in user order."""
    U, N = len(lengths), int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    user = np.repeat(np.arange(U), lengths)
    p_cate = world.cate_mass / world.cate_mass.sum()
    interests = rng.choice(len(p_cate), size=(U, cfg.n_interests), p=p_cate)  # [U, K]
    # The drifting interest changes at random points; a user's first event starts a new segment.
    new_segment = rng.random(N) < 1.0 / cfg.drift_every
    new_segment[offsets[:-1][lengths > 0]] = True
    segment = np.cumsum(new_segment) - 1
    drift_cate = rng.choice(len(p_cate), size=int(segment[-1]) + 1 if N else 0, p=p_cate)
    source = rng.random(N)
    cate = np.where(source < cfg.p_interest, interests[user, rng.integers(0, cfg.n_interests, N)], drift_cate[segment])
    item = items_in(world, cate, rng.random(N))
    noise = source >= cfg.p_interest + cfg.p_drift
    item[noise] = _draw(world.cum_all, rng.random(int(noise.sum()))) + 1
    gap = rng.exponential(3600.0, N).astype(np.int64) + 1  # strictly increasing time within a user
    csum = np.cumsum(gap)
    start = T0_SECONDS + rng.integers(0, 30 * 86400, U)
    ts = start[user] + csum - np.concatenate([[0], csum])[offsets[:-1]][user]
    return item, ts, offsets


class FamilyIndex:
    """Sorted (user, family, pos) keys of a chunk: 'did family f occur in user u's events before p?'."""

    def __init__(self, user: np.ndarray, fam: np.ndarray, pos: np.ndarray, n_fam: int):
        self.n_fam, self.P = n_fam, int(pos.max()) + 2 if len(pos) else 2
        if (user.max(initial=0) + 1) * n_fam * self.P >= 2**63:
            raise ValueError("chunk too large for int64 family keys: lower chunk_events")
        self.keys = np.sort((user * n_fam + fam) * self.P + pos)

    def range_before(self, user: np.ndarray, fam: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) indices into `keys` of the occurrences of `fam` before `pos`."""
        base = (user * self.n_fam + fam) * self.P
        return np.searchsorted(self.keys, base), np.searchsorted(self.keys, base + pos)

    def last_before(self, user: np.ndarray, fam: np.ndarray, pos: np.ndarray) -> np.ndarray:
        lo, hi = self.range_before(user, fam, pos)
        return np.where(hi > lo, self.keys[np.maximum(hi - 1, 0)] % self.P, -1)


def pick_targets(split: np.ndarray, offsets: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of target events: each eligible event with probability `rate`, plus the last one of each
    (user, split) so every user keeps at least one target per split it has."""
    n = len(split)
    user_end = np.zeros(n, dtype=bool)
    user_end[offsets[1:][offsets[1:] > offsets[:-1]] - 1] = True
    last = (split >= 0) & (user_end | np.r_[split[1:] != split[:-1], True])
    return np.flatnonzero((split >= 0) & ((rng.random(n) < rate) | last))


def build_targets(world: World, cfg: SyntheticConfig, fam: np.ndarray, offsets: np.ndarray, t_user: np.ndarray,
                  t_pos: np.ndarray, index: FamilyIndex, rng: np.random.Generator):
    """Per target: the positive item, the negatives [T, n_neg], far flags, and evidence (offsets, positions)."""
    fs, T = cfg.family_size, len(t_user)
    start = offsets[t_user]
    w = cfg.window
    # Positive family: taken from a history event, far back where asked and possible.
    pick = np.full(T, -1, dtype=np.int64)
    open_ = np.flatnonzero((rng.random(T) < cfg.far_fraction) & (t_pos > w))
    for _ in range(FAR_ROUNDS):
        if not len(open_):
            break
        j = (rng.random(len(open_)) * (t_pos[open_] - w)).astype(np.int64)
        f = fam[start[open_] + j]
        ok = index.last_before(t_user[open_], f, t_pos[open_]) < t_pos[open_] - w
        pick[open_[ok]] = j[ok]
        open_ = open_[~ok]
    near = pick < 0
    lo = np.maximum(t_pos[near] - w, 0)
    pick[near] = lo + (rng.random(int(near.sum())) * (t_pos[near] - lo)).astype(np.int64)
    pos_fam = fam[start + pick]
    last = index.last_before(t_user, pos_fam, t_pos)
    far = last < t_pos - w
    n_fam = len(world.fam_cate)
    member = lambda f: np.minimum(f * fs + 1 + rng.integers(0, fs, len(f)), world.n_items)  # noqa: E731
    pos_item = member(pos_fam)
    # Negatives: same category first (hard), then any item; never a family the user has seen before pos.
    negs = np.zeros((T, cfg.split.negatives), dtype=np.int64)
    neg_fam = np.full((T, cfg.split.negatives), -1, dtype=np.int64)
    cate = world.fam_cate[pos_fam]
    for slot in range(cfg.split.negatives):
        open_ = np.arange(T)
        for r in range(NEG_ROUNDS):
            if not len(open_):
                break
            u = rng.random(len(open_))
            if r < NEG_SAME_CATEGORY_ROUNDS:
                f = (items_in(world, cate[open_], u) - 1) // fs
            elif r < NEG_ROUNDS // 2:
                f = _draw(world.cum_all, u) // fs
            else:  # long histories cover the popular families: rare ones are the unseen ones
                f = (u * n_fam).astype(np.int64)
            lo_, hi_ = index.range_before(t_user[open_], f, t_pos[open_])
            ok = (hi_ == lo_) & (f != pos_fam[open_]) & (neg_fam[open_, :slot] != f[:, None]).all(axis=1)
            neg_fam[open_[ok], slot] = f[ok]
            open_ = open_[~ok]
        for t in open_:  # exact: any family unseen before pos
            taken = np.r_[fam[start[t] : start[t] + t_pos[t]], pos_fam[t], neg_fam[t, :slot]]
            free = np.setdiff1d(np.arange(n_fam), taken)
            if not len(free):
                raise ValueError(f"user {t_user[t]} has seen every item family before pos {t_pos[t]}: "
                                 f"no unseen negative exists; raise n_items (now {cfg.n_items})")
            neg_fam[t, slot] = free[rng.integers(len(free))]
        negs[:, slot] = member(neg_fam[:, slot])
    # Evidence: the most recent max_evidence occurrences of the positive's family before pos.
    lo, hi = index.range_before(t_user, pos_fam, t_pos)
    lo = np.maximum(lo, hi - cfg.max_evidence)
    counts = hi - lo
    ev_off = np.concatenate([[0], np.cumsum(counts)])
    at = np.repeat(lo - ev_off[:-1], counts) + np.arange(ev_off[-1])
    ev_pos = index.keys[at] % index.P
    return pos_item, negs, far, ev_off, ev_pos


def rule_probability(fires: np.ndarray, noise: float) -> np.ndarray:
    """P(label = 1 | full history, target) from whether the hidden rule fires (the Bayes-optimal score)."""
    return np.where(fires, 1.0 - noise, noise)


def _split_table(user, pos, pos_item, negs, item_cate, ev_off, ev_pos, noise: float, rng: np.random.Generator) -> pa.Table:
    """Rows per target: the positive (with its evidence) then its negatives (empty evidence)."""
    T, k = len(user), negs.shape[1] + 1
    items = np.concatenate([pos_item[:, None], negs], axis=1).ravel()
    fires = np.zeros((T, k), dtype=bool)
    fires[:, 0] = True
    p_label = rule_probability(fires, noise)
    labels = fires.astype(np.int8)
    if noise > 0:
        labels ^= (rng.random((T, k)) < noise).astype(np.int8)
    row_counts = np.zeros((T, k), dtype=np.int64)
    row_counts[:, 0] = np.diff(ev_off)
    offsets = np.concatenate([[0], np.cumsum(row_counts.ravel())]).astype(np.int32)
    evidence = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ev_pos.astype(np.int32)))
    return pa.Table.from_arrays([
        pa.array(np.repeat(user, k).astype(np.int32)), pa.array(np.repeat(pos, k).astype(np.int32)),
        pa.array(items.astype(np.int32)), pa.array(item_cate[items].astype(np.int32)),
        pa.array(labels.ravel()), evidence, pa.array(p_label.ravel().astype(np.float32)),
    ], schema=SYNTHETIC_SPLIT_SCHEMA)


def _auc_or_none(p: list[np.ndarray], y: list[np.ndarray]) -> float | None:
    from recsys.metrics import auc

    if not p:
        return None
    y_all = np.concatenate(y)
    return float(auc(y_all, np.concatenate(p))) if 0 < y_all.sum() < len(y_all) else None


def _chunks(lengths: np.ndarray, chunk_events: int) -> Iterator[tuple[int, int]]:
    """Consecutive user ranges [a, b) of about chunk_events events (one user may exceed it alone)."""
    a, total = 0, 0
    for b in range(len(lengths)):
        total += int(lengths[b])
        if total >= chunk_events:
            yield a, b + 1
            a, total = b + 1, 0
    if a < len(lengths):
        yield a, len(lengths)


def generate(cfg: SyntheticConfig, out_dir: str | Path, progress=None) -> dict:
    """Write events.parquet, train/val/test.parquet (with evidence), meta.json and the manifest into
    `out_dir` (files replaced). `progress(events_done, events_total)` is called after each chunk. Returns the meta dict."""
    if cfg.split.min_history < 1:
        raise ValueError("synthetic targets need at least one history event: split.min_history must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an old manifest must not outlive the files it described
    remove_parts(out, ("events", *SPLITS))
    world = build_world(cfg)
    lengths = sequence_lengths(cfg)
    n_fam = len(world.fam_cate)
    names = ["events", *SPLITS]
    tmp = {n: out / f"{n}.parquet.tmp" for n in names}
    writers = {"events": pq.ParquetWriter(tmp["events"], DATASET_EVENTS_SCHEMA)}
    writers |= {s: pq.ParquetWriter(tmp[s], SYNTHETIC_SPLIT_SCHEMA) for s in SPLITS}
    rows = dict.fromkeys(SPLITS, 0)
    far_rows, positives, evidence_total, done = 0, 0, 0, 0
    ceiling = {name: ([], []) for name in SPLITS}  # (p_label, label) per split, for the ceiling AUC
    try:
        for a, b in _chunks(lengths, cfg.chunk_events):
            rng = np.random.default_rng([cfg.seed, 2, a])
            item, ts, offsets = generate_events(world, cfg, lengths[a:b], rng)
            user = np.repeat(np.arange(b - a), lengths[a:b])
            pos = np.arange(len(item)) - offsets[user]
            cate = world.item_cate[item]
            writers["events"].write_table(pa.Table.from_arrays([
                pa.array((user + a).astype(np.int32)), pa.array(pos.astype(np.int32)), pa.array(item.astype(np.int32)),
                pa.array(cate.astype(np.int32)), pa.array(ts)], schema=DATASET_EVENTS_SCHEMA))
            fam = (item - 1) // cfg.family_size
            index = FamilyIndex(user, fam, pos, n_fam)
            split = split_of_events(offsets, cfg.split)
            targets = pick_targets(split, offsets, cfg.target_rate, rng)
            t_user, t_pos, t_split = user[targets], pos[targets], split[targets]
            pos_item, negs, far, ev_off, ev_pos = build_targets(world, cfg, fam, offsets, t_user, t_pos, index, rng)
            for s, name in enumerate(SPLITS):
                sel = np.flatnonzero(t_split == s)
                e_lo, e_hi = ev_off[sel], ev_off[sel + 1]
                counts = e_hi - e_lo
                sub_off = np.concatenate([[0], np.cumsum(counts)])
                sub_pos = ev_pos[np.repeat(e_lo - sub_off[:-1], counts) + np.arange(sub_off[-1])]
                # own stream: label noise never changes what the other draws produce
                noise_rng = np.random.default_rng([cfg.seed, 3, a, s])
                t = _split_table(t_user[sel] + a, t_pos[sel], pos_item[sel], negs[sel], world.item_cate,
                                 sub_off, sub_pos, cfg.label_noise, noise_rng)
                writers[name].write_table(t)
                rows[name] += t.num_rows
                ceiling[name][0].append(t.column("p_label").to_numpy())
                ceiling[name][1].append(t.column("label").to_numpy())
            far_rows += int(far.sum())
            positives += len(targets)
            evidence_total += int(ev_off[-1])
            done += len(item)
            if progress is not None:
                progress(done, int(lengths.sum()))
    finally:
        for w in writers.values():
            w.close()
    for n in names:
        os.replace(tmp[n], out / f"{n}.parquet")
    meta = {
        "format": FORMAT,
        "source": "synthetic",
        "seed": cfg.seed,
        "config": cfg.model_dump(),
        "ts_unit": "s",
        "n_users": cfg.n_users,
        "n_items": cfg.n_items,
        "n_categories": cfg.n_cates,
        "n_events": int(lengths.sum()),
        "history_length": {"mean": float(lengths.mean()), "max": int(lengths.max())},
        "rows": rows,
        "positives": positives,
        "far_positive_share": far_rows / max(positives, 1),
        "evidence_mean": evidence_total / max(positives, 1),
        "label_noise": cfg.label_noise,
        "ceiling_auc": {name: _auc_or_none(*ceiling[name]) for name in SPLITS},
    }
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(out / "meta.json.tmp", out / "meta.json")
    write_manifest(out)
    return meta
