"""A preallocated key/value cache for incremental decoding, with per-row padding and positions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen3.config import Qwen3Config


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to ``max_len``.

    ``valid`` marks which cached slots hold real tokens (left padding of a batch of prompts of
    different lengths leaves holes), and ``next_pos`` is each row's next RoPE position, so rows
    of different lengths keep their own positions. ``last_logits`` holds the logits after the
    most recent forward, so generation can continue from a cache with no new tokens. A slot is
    never reused: tokens that must not count (padding, a stopped row's leftovers) become holes.
    """

    def __init__(
        self,
        config: Qwen3Config,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)
        ]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, L)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.length = 0  # slots used so far (same for every row)
        self.padded = False  # any hole in `valid` so far
        self.last_logits: torch.Tensor | None = None  # (B, V)
        self.max_len = max_len
        self.batch_size = batch_size
        self._pending = 0  # tokens of the forward in progress

    def begin(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reserve slots for new tokens; return their position ids (B, T) and the attention mask.

        ``new_valid`` (B, T) is True for real tokens, False for padding. The mask is None when no
        row has padding (then plain causal attention is exact).
        """
        b, t = new_valid.shape
        if b != self.batch_size:
            raise ValueError(f"KVCache holds {self.batch_size} sequences, got a batch of {b}.")
        if self.length + t > self.max_len:
            raise ValueError(
                f"KVCache is full: {self.length} cached + {t} new tokens > max_len={self.max_len}; "
                "allocate a larger cache (max_len) or generate fewer tokens."
            )
        start = self.length
        self.valid[:, start : start + t] = new_valid
        self.padded = self.padded or not bool(new_valid.all())
        positions = self.next_pos[:, None] + new_valid.long().cumsum(dim=1) - 1  # (B, T)
        positions = positions.clamp(min=0)
        self.next_pos = self.next_pos + new_valid.long().sum(dim=1)
        self._pending = t
        if not self.padded and (start == 0 or t == 1):
            return positions, None  # plain causal prefill, or one unpadded decode step
        s = start + t
        keys = torch.arange(s, device=new_valid.device)
        queries = torch.arange(start, s, device=new_valid.device)
        causal = keys[None, :] <= queries[:, None]  # (T, S)
        mask = causal[None] & self.valid[:, None, :s]  # (B, T, S)
        # A padding query may attend to itself, so that no softmax row is empty (that gives NaN).
        mask |= (keys[None, :] == queries[:, None])[None]
        return positions, mask[:, None]  # (B, 1, T, S)

    def begin_dense(self, num_new: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`begin` for ``num_new`` real tokens in every row (no padding), in fewer ops.

        This is the per-token decode path, so it avoids reading anything back from the device.
        Without padding so far every row's positions are its slot indices, so the positions come
        back as None: they are ``length .. length + num_new - 1`` (a slice of the RoPE table, not
        a gather).
        """
        start = self.length
        if self.padded or (start != 0 and num_new != 1) or start + num_new > self.max_len:
            # Masks (or the full-cache error) needed: the general path handles them.
            dense = torch.ones(self.batch_size, num_new, dtype=torch.bool, device=self.valid.device)
            return self.begin(dense)
        self.valid.narrow(1, start, num_new).fill_(True)
        self.next_pos += num_new
        self._pending = num_new
        return None, None

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, K, T, D) keys/values of one layer; return all cached so far."""
        start, t = self.length, k.shape[2]
        keys, values = self.k[layer], self.v[layer]
        # narrow + copy_: the per-token decode path, a little cheaper than slice assignment.
        keys.narrow(2, start, t).copy_(k)
        values.narrow(2, start, t).copy_(v)
        return keys.narrow(2, 0, start + t), values.narrow(2, 0, start + t)

    @torch.inference_mode()
    def discard(self, row: int, start: int) -> None:
        """Take the slots ``start`` onwards out of ``row``'s sequence.

        For tokens a row decoded in a batch after it had stopped: they stay in memory as holes
        (like left padding), hidden from later tokens, and the row's positions continue as if
        they had never been decoded. No read-back from the device.
        """
        if start >= self.length:
            return
        dropped = self.valid[row, start : self.length]
        self.next_pos[row] -= dropped.sum()
        dropped.fill_(False)
        self.padded = True

    @torch.inference_mode()
    def drop_rows(self, rows: Sequence[int]) -> None:
        """Take ``rows`` out of the batch; the others keep their slots, positions and logits.

        Slots no remaining row uses (the holes before its first token) are cut from the front,
        so a long-running batch stays as long as its longest live row. The room left for new
        tokens (``max_len - length``) never shrinks.
        """
        gone = set(rows)
        keep = [i for i in range(self.batch_size) if i not in gone]
        self._rebuild([(self, keep)], self.max_len)

    @torch.inference_mode()
    def add_rows(self, other: KVCache) -> None:
        """Append the rows of ``other`` (e.g. a newly prefilled request) to this batch.

        The two are aligned at their ends: every row's next token goes to the same slot, and
        the shorter side's rows get holes in front (hidden like left padding), keeping their own
        positions. The room left for new tokens is the larger of the two.
        """
        if other._pending or self._pending:
            raise ValueError("KVCache.add_rows: a forward is in progress on one of the caches.")
        if len(other.k) != len(self.k) or other.k[0].shape[1::2] != self.k[0].shape[1::2]:
            raise ValueError("KVCache.add_rows: the caches belong to different model shapes.")
        if (other.k[0].dtype, other.k[0].device) != (self.k[0].dtype, self.k[0].device):
            raise ValueError("KVCache.add_rows: the caches differ in dtype or device.")
        room = max(self.max_len - self.length, other.max_len - other.length)
        length = max(self.length, other.length)
        parts = [(self, list(range(self.batch_size))), (other, list(range(other.batch_size)))]
        self._rebuild(parts, length + room)

    def _rebuild(self, parts: list[tuple[KVCache, list[int]]], max_len: int) -> None:
        """Make this cache the given rows of each part, in order, ends aligned, in new tensors of
        ``max_len`` slots; leading slots that no row holds are cut."""
        parts = [(c, rows) for c, rows in parts if rows]
        length = max((c.length for c, _ in parts), default=0)
        # Columns of the aligned result where some row holds a token: the first one starts it.
        valid = torch.zeros(sum(len(r) for _, r in parts), length, dtype=torch.bool)
        valid = valid.to(self.valid.device)
        b = 0
        for cache, rows in parts:
            valid[b : b + len(rows), length - cache.length :] = cache.valid[rows, : cache.length]
            b += len(rows)
        used = valid.any(dim=0).nonzero()
        cut = int(used[0]) if len(used) else length
        new_length = length - cut
        max_len -= cut  # the room for new tokens stays what it was
        device, dtype = self.k[0].device, self.k[0].dtype
        for store in (self.k, self.v):
            for layer in range(len(store)):
                shape = (b, store[layer].shape[1], max_len, store[layer].shape[3])
                new = torch.zeros(shape, device=device, dtype=dtype)
                row = 0
                for cache, rows in parts:
                    # The part's own slots that survive the cut, placed so the ends align.
                    skip = max(0, cut - (length - cache.length))
                    src = (cache.k if store is self.k else cache.v)[layer]
                    kept = cache.length - skip
                    dst = new[row : row + len(rows), :, new_length - kept : new_length]
                    dst.copy_(src[rows, :, skip : cache.length])
                    row += len(rows)
                store[layer] = new
        self.valid = torch.zeros(b, max_len, dtype=torch.bool, device=self.valid.device)
        self.valid[:, :new_length] = valid[:, cut:]
        positions = [c.next_pos[rows] for c, rows in parts]
        self.next_pos = torch.cat(positions) if parts else self.next_pos[:0]
        logits = [c.last_logits[rows] for c, rows in parts if c.last_logits is not None]
        self.last_logits = torch.cat(logits) if len(logits) == len(parts) and parts else None
        self.batch_size, self.length, self.max_len = b, new_length, max_len
        self.padded = not bool(self.valid[:, :new_length].all())

    def commit(self, last_logits: torch.Tensor) -> None:
        """Close the forward in progress: advance the length and remember the last logits."""
        self.length += self._pending
        self._pending = 0
        self.last_logits = last_logits
