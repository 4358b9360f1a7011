"""4-bit E3M0: a sign bit and a 3-bit exponent with no mantissa (Streaming DiLoCo's FP4 codec).

Code e=0 is zero, e=1..7 is 2^(S+e-7), where S is the block's shared power-of-two exponent (one
byte, like MX formats' E8M0 scale), chosen so that the block's absmax ≤ 2^S. Rounding is to the
nearest level, so |x − q(x)| ≤ max(|x|/3, 2^(S−7)) ≤ max(|x|/3, absmax/64). Two codes are packed
per byte, low nibble first. S is clamped to [−127, 127]: for absmax < 2^-127 the bound is 2^-134
rather than absmax/64, and for absmax > 2^127 values above 1.5·2^127 round down to 2^127.
Encoding and decoding go by look-up tables (below the class); decoding always produces fp32.
"""
from __future__ import annotations

import bisect

import torch

from .base import Codec, Encoded


class E3M0Codec(Codec):
    """4-bit E3M0 with a shared power-of-two (E8M0) exponent per block.

    Encoding and decoding work on fp32 bit patterns rather than calling frexp/ldexp per value, and in
    chunks of `CHUNK` values so that the temporaries stay in cache; the output is bit for bit that of
    the float formulation in `_encode_exact` (tests/test_codecs.py holds it as a reference and checks
    the two agree). The bit tricks are exact for blocks with absmax 0 or in [2^-119, 2^127]; the rest
    (subnormal-sized absmax, a clamped scale exponent, NaN/inf) take `_encode_exact`. Non-finite input
    gets finite codes that mean nothing (NaN codes as +0 and drags its block's scale to 2^-127; a
    block holding ±inf gets S = 0), so the data plane's check for non-finite decoded values cannot
    catch it: keep NaN/inf out before encoding.
    """

    bits, scale_bytes, scale_dtype = 4, 1, torch.uint8
    decodes_finite = True  # |value| ≤ 2^S ≤ 2^127 whatever the bytes (S is clamped)
    BIAS = 127
    CHUNK = 1 << 16  # values per pass: a few int32 temporaries of this size fit in L2

    def __init__(self, block: int = 1024):
        self.name, self.codec_id, self.block = "e3m0", 5, block

    def _unit(self) -> int:
        # Chunks are whole blocks of an even length, so that scales and packed bytes never straddle two.
        return self.block if self.block % 2 == 0 else 2 * self.block

    def _step(self) -> int:
        return max(self.CHUNK // self._unit(), 1) * self._unit()

    def encode(self, x: torch.Tensor) -> Encoded:
        x = x.detach().float().reshape(-1)
        n, block, step = x.numel(), self.block, self._step()
        # Whole chunks are read in place; the rest is copied and zero-padded to whole blocks (and an
        # even length), as the float formulation pads.
        whole = n // step * step
        tail = x.new_zeros(-(-(n - whole) // self._unit()) * self._unit())
        tail[: n - whole] = x[whole:]

        # Per block: S = ceil(log2 absmax) from absmax's bits (its unbiased exponent, plus one unless it
        # is a power of two), and the offset that turns a value's bits into its code (see below).
        absmax = torch.cat([_absmax(x[:whole], block), _absmax(tail, block)])
        amax = absmax.view(torch.int32) & 0x7FFFFFFF
        shared = (amax >> 23) - self.BIAS + ((amax & 0x7FFFFF) != 0).to(torch.int32)
        shared = torch.where(amax > 0, shared, -self.BIAS)
        offset = torch.where(amax > 0, 2 * shared + 2 * self.BIAS - 15, 1 << 20)
        # The bit arithmetic is exact only if subnormal x cannot reach code 1 (S ≥ −119, i.e. absmax ≥
        # 2^-119), y = |x| / 2^S ≤ 1 (absmax ≤ 2^127, no clamped S) and x is finite; other blocks take
        # the float formulation.
        slow = ((amax > 0) & (amax < 8 << 23)) | (amax > 254 << 23)
        slow_rows = slow.nonzero().view(-1).tolist()

        packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=x.device)
        if block % 2 == 0:
            self._pack_by_table(x, tail, whole, offset, slow_rows, shared, packed)
            scales = (shared[: -(-n // block)] + self.BIAS).to(torch.uint8)
            return Encoded(self, n, scales, packed)
        buffers = [torch.empty(step, dtype=torch.int32, device=x.device) for _ in range(3)]
        for lo in range(0, n, step):
            src = x[lo: lo + step] if lo < whole else tail
            m, b0 = src.numel(), lo // block
            bits = src.view(torch.int32)
            mag, v, t = (buf[:m] for buf in buffers)
            torch.bitwise_and(bits, 0x7FFFFFFF, out=mag)  # |x| as an integer; ordered like |x|
            # For y ≥ 2^-7, mag >> 22 is 2·(biased exponent) + (top mantissa bit), so
            # v = (mag >> 22) − (2S + 239) = 2·(floor(log2 y) + 7) + top + 1, and v >> 1 is the nearest
            # level plus 7 (rounding up from 0.75·2^k, as frexp's mant ≥ 0.75 does). v ≤ 0 exactly when
            # y < 2^-7 (code 0); v = 1 is y in [2^-7, 1.5·2^-7), whose level −7 is lifted to code 1,
            # hence the max with clamp(v, 0, 1). All-zero blocks' offset sends every v below 0.
            torch.bitwise_right_shift(mag, 22, out=v)
            v.view(-1, block).sub_(offset[b0: b0 + m // block, None])
            torch.clamp(v, 0, 1, out=t)
            torch.maximum(v.bitwise_right_shift_(1), t, out=v)
            # Sign in bit 3 for x < 0: sign bit set and |x| > 0 (−0.0 codes like +0.0); −mag is
            # negative exactly when mag > 0, so (bits & −mag) >> 31 is −1 for x < 0 and 0 otherwise.
            torch.neg(mag, out=t).bitwise_and_(bits).bitwise_right_shift_(31)
            v.sub_(t, alpha=8)
            lo_row = bisect.bisect_left(slow_rows, b0)
            hi_row = bisect.bisect_left(slow_rows, b0 + m // block)
            if lo_row < hi_row:
                rows = torch.tensor(slow_rows[lo_row:hi_row], device=x.device)
                code, shared[rows] = self._encode_exact(src.view(-1, block)[rows - b0])
                v.view(-1, block)[rows - b0] = code.to(torch.int32)
            # Two codes per byte, low nibble first: as int64 (little-endian, like the rest of the wire
            # format) a pair is lo + 2^32·hi, and the low byte of (pair >> 28) | pair is lo | hi << 4.
            pair = v.view(torch.int64)
            t64 = t.view(torch.int64)
            torch.bitwise_right_shift(pair, 28, out=t64).bitwise_or_(pair)
            nbytes = min(m, n - lo + 1) // 2
            packed[lo // 2: lo // 2 + nbytes] = t64[:nbytes]
        scales = (shared[: -(-n // block)] + self.BIAS).to(torch.uint8)
        return Encoded(self, n, scales, packed)

    def _pack_by_table(self, x, tail, whole, offset, slow_rows, shared, packed) -> None:
        """The codes of an even block size, packed two per byte, with one table look-up per byte.

        With u = bits >> 22 (an arithmetic shift: u in [−512, −1] for x < 0) and w = u − offset, the
        bit arithmetic's v (above) is w for x ≥ 0 and w + 512 for x < 0, and in blocks that take it
        (offset in [1, 493]) x ≥ 0 gives w ≥ −493 and x < 0 gives w ≤ −497: `_CODE_OF_W` is the code as
        a function of w alone, and `_PAIR_CODES` that of two neighbours, lo + 16·hi. −0.0 must code as
        +0.0, and as u it would look like a tiny negative number: x + 0.0 turns −0.0 into +0.0 and
        leaves every other value's bits as they are. All-zero and slow blocks get an offset (493) that
        keeps the look-up in the table; slow blocks' codes are then overwritten as before.
        """
        n, block, step, half = x.numel(), self.block, self._step(), self.block // 2
        k, base = _W_SPAN, _W_BASE
        o = torch.where((offset >= 1) & (offset <= 493), offset, 493)
        # p = (u_lo − o + base) + k·(u_hi − o + base) = u_lo + k·u_hi − (k + 1)·(o − base)
        poff = (o - base) * (k + 1)
        f = torch.empty(step, dtype=torch.float32, device=x.device)
        p = torch.empty(step // 2, dtype=torch.int32, device=x.device)
        spare = torch.empty(step // 2, dtype=torch.uint8, device=x.device)
        table = _pair_codes(x.device)
        for lo in range(0, n, step):
            src = x[lo: lo + step] if lo < whole else tail
            m, b0 = src.numel(), lo // block
            u = f[:m]
            torch.add(src, 0.0, out=u)
            u = u.view(torch.int32).bitwise_right_shift_(22)
            pairs = p[: m // 2]
            torch.add(u[0::2], u[1::2], alpha=k, out=pairs)
            pairs.view(-1, half).sub_(poff[b0: b0 + m // block, None])
            nbytes = min(m, n - lo + 1) // 2
            direct = nbytes == m // 2  # a whole chunk: straight into the output
            dst = packed[lo // 2: lo // 2 + m // 2] if direct else spare[: m // 2]
            torch.index_select(table, 0, pairs, out=dst)
            lo_row = bisect.bisect_left(slow_rows, b0)
            hi_row = bisect.bisect_left(slow_rows, b0 + m // block)
            if lo_row < hi_row:
                rows = torch.tensor(slow_rows[lo_row:hi_row], device=x.device)
                code, shared[rows] = self._encode_exact(src.view(-1, block)[rows - b0])
                code = code.view(-1, half, 2)
                dst.view(-1, half)[rows - b0] = code[:, :, 0] | code[:, :, 1] << 4
            if not direct:
                packed[lo // 2: lo // 2 + nbytes] = dst[:nbytes]

    def _encode_exact(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float formulation of the codes (uint8, sign in bit 3) and S, for blocks of shape (m, block)."""
        amax = blocks.abs().amax(dim=1)
        # Smallest S with absmax ≤ 2^S; all-zero blocks get the smallest exponent (their codes are 0).
        _, exp = torch.frexp(amax)
        exact = amax == torch.ldexp(torch.full_like(amax, 0.5), exp)
        shared = torch.where(exact, exp - 1, exp).clamp(-self.BIAS, self.BIAS)
        shared = torch.where(amax > 0, shared, torch.full_like(shared, -self.BIAS))
        y = torch.ldexp(blocks.abs(), -shared[:, None])  # in [0, 1]
        mant, e = torch.frexp(y)  # y = mant · 2^e, mant in [0.5, 1)
        level = e - 1 + (mant >= 0.75).to(e.dtype)  # nearest power of two, as an exponent ≤ 0
        code = torch.where(y >= 2.0 ** -7, (level + 7).clamp(1, 7), torch.zeros_like(level))
        code = code.to(torch.uint8) | (blocks < 0).to(torch.uint8) << 3
        return code, shared

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        n, block, step, device = enc.numel, self.block, self._step(), enc.device
        out = torch.empty(n, device=device) if out is None else out
        if block % 2 == 0:
            # Each byte and its block's scale byte look up both of its decoded values at once.
            table, index = _scaled_pairs(device), self._pair_index(enc)
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                _gather(table, index(lo, hi), out[lo:hi])
            return out
        shared = (enc.scales.to(torch.int32) - self.BIAS).clamp(max=self.BIAS)
        scale = torch.ldexp(torch.ones(shared.numel(), device=device), shared)  # exact: 2^-127 is a subnormal, not 0
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            m, s = hi - lo, scale[lo // block: -(-hi // block)]
            # Each byte looks up both of its values at once (one int64 = two fp32), then the block
            # scale multiplies them: level · 2^S is a power of two ≥ 2^-133, so the product is exact.
            pairs = _e3m0_pairs(device).index_select(0, enc.values[lo // 2: (hi + 1) // 2].to(torch.int32))
            vals = pairs.view(torch.float32)[:m]
            full = m // block * block
            torch.mul(vals[:full].view(-1, block), s[: full // block, None], out=out[lo: lo + full].view(-1, block))
            if full < m:
                torch.mul(vals[full:], s[-1], out=out[lo + full: hi])
        return out

    def decode_into(self, enc: Encoded, out: torch.Tensor) -> torch.Tensor:
        return self.decode(enc, out)

    def _pair_index(self, enc: Encoded):
        """For an even block: index(lo, hi) gives, for the bytes of values [lo, hi) (lo a multiple of
        `_step()`), 256 · (scale byte) + byte, the row of `_scaled_pairs()` holding their two values.
        The returned tensor is reused by the next call."""
        block, half = self.block, self.block // 2
        srow = enc.scales.to(torch.int32) << 8
        buf = torch.empty(self._step() // 2, dtype=torch.int32, device=enc.device)

        def index(lo: int, hi: int) -> torch.Tensor:
            nb, b0 = (hi - lo + 1) // 2, lo // block
            idx = buf[:nb]
            idx.copy_(enc.values[lo // 2: lo // 2 + nb])
            full = nb // half * half
            idx[:full].view(-1, half).add_(srow[b0: b0 + full // half, None])
            if full < nb:
                idx[full:].add_(srow[b0 + full // half])
            return idx
        return index

    def weighted_sum(self, parts: list[tuple[Encoded, float]], out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Σ alpha_i · decode(enc_i) in fp32, bit for bit what `acc = zeros(n); acc.add_(decode(enc_i),
        alpha=alpha_i)` in order gives, without decoding the parts: each byte looks up its two values
        already times alpha_i in a table, chunk by chunk, so the accumulator's chunk stays in cache.
        None where that equality is not guaranteed (an odd block, other codecs, alpha outside [0, 1],
        or a part whose values times alpha could be subnormal); the caller then decodes.

        Why it is exact: decoded values are ±2^k (or ±0) with k ≤ 127, so alpha · x is exact unless it
        underflows (checked per block), and then acc + alpha·x is one rounding whether add_ fuses
        the multiply (its vectorized path) or not. The table holds 0 + alpha·x as add_ computes it
        (+0.0 for −0.0), which is acc's first value; acc never holds −0.0, so +0.0 and −0.0 add alike.
        Parts with alpha 0 (in fp32) add +0.0 or −0.0 and are skipped. The sum is written into `out`
        (fp32, n values) if given."""
        if self.block % 2 or not parts:
            return None
        n, device = parts[0][0].numel, parts[0][0].device
        if any(enc.codec is not self or enc.numel != n or enc.device != device for enc, _ in parts):
            return None
        live = []
        for enc, alpha in parts:
            a32 = float(torch.tensor(alpha, dtype=torch.float32))  # add_ casts alpha to fp32 so
            if not 0.0 <= a32 <= 1.0:
                return None
            if a32 == 0.0:
                continue
            if not self._no_underflow(enc, a32):
                return None
            table = torch.zeros(2 * _SCALED_PAIRS_ROWS, device=device).add_(
                _scaled_pairs(device).view(torch.float32), alpha=alpha)
            live.append((self._pair_index(enc), table.view(torch.int64)))
        acc = torch.empty(n, device=device) if out is None else out
        if not live:
            acc.zero_()
        tmp = torch.empty(self._step(), device=device)
        for lo in range(0, n if live else 0, self._step()):
            hi = min(lo + self._step(), n)
            for i, (index, table) in enumerate(live):
                if i == 0:
                    _gather(table, index(lo, hi), acc[lo:hi])
                else:
                    _gather(table, index(lo, hi), tmp[: hi - lo])
                    acc[lo:hi].add_(tmp[: hi - lo])
        return acc

    def _no_underflow(self, enc: Encoded, alpha: float) -> bool:
        """No nonzero value of enc times alpha is below 2^-126: blocks whose smallest nonzero level
        2^(S−6) would be are all-zero codes (0 or 8: ±0)."""
        shared = (enc.scales.to(torch.int32) - self.BIAS).clamp(max=self.BIAS)
        low = shared < _min_safe_exponent(alpha)
        if not bool(low.any()):
            return True
        half, rows = self.block // 2, low.nonzero().view(-1)
        values, whole = enc.values, enc.values.numel() // half
        inner = rows[rows < whole]
        if bool((values[: whole * half].view(-1, half)[inner] & 0x77).any()):
            return False
        return not (rows.numel() and int(rows[-1]) >= whole and bool((values[whole * half:] & 0x77).any()))


# E3M0 code → value / 2^S: 0, 2^-6 … 2^0, then the same negated (code 8 is −0.0).
_E3M0_LEVELS = [0.0] + [2.0 ** (e - 7) for e in range(1, 8)]
_E3M0_VALUES = torch.tensor(_E3M0_LEVELS + [-v for v in _E3M0_LEVELS])
# Packed byte → (low nibble's value, high nibble's value), stored as one int64 per byte.
_E3M0_PAIRS = torch.stack([_E3M0_VALUES.repeat(16), _E3M0_VALUES.repeat_interleave(16)], 1).view(torch.int64).view(-1)

# The tables, per device: each is computed once on the CPU and copied, so that every device decodes
# by the same bits (a look-up is a copy; a table computed on another device could round differently).
_ON_DEVICE: dict = {}


def _on(device, name: str, make) -> torch.Tensor:
    device = torch.device(device)
    table = _ON_DEVICE.get((name, device))
    if table is None:
        table = _ON_DEVICE[(name, device)] = make().to(device)
    return table


def _e3m0_pairs(device) -> torch.Tensor:
    return _on(device, "pairs", lambda: _E3M0_PAIRS)


# E3M0 decoding by table (even blocks): row 256 · (scale byte) + byte holds the byte's two values
# times 2^S as one int64, the same products as the multiply in E3M0Codec.decode's odd-block path.
_SCALED_PAIRS_ROWS = 256 * 256


def _make_scaled_pairs() -> torch.Tensor:
    shared = (torch.arange(256, dtype=torch.int32) - E3M0Codec.BIAS).clamp(max=E3M0Codec.BIAS)
    scale = torch.ldexp(torch.ones(256), shared)
    table = _E3M0_PAIRS.view(torch.float32).view(1, 512) * scale[:, None]
    return table.reshape(-1).view(torch.int64)


def _scaled_pairs(device="cpu") -> torch.Tensor:
    return _on(device, "scaled", _make_scaled_pairs)


def _min_safe_exponent(alpha: float) -> int:
    """The least S for which alpha · 2^(S−6) ≥ 2^-126 (alpha > 0)."""
    s = -200
    while alpha * 2.0 ** (s - 6) < 2.0 ** -126:
        s += 1
    return s


def _gather(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32, len(out) ≤ 2·len(index)) ← the fp32 pairs table[index] (an int64 table)."""
    m = out.numel()
    if m == 2 * index.numel() and out.storage_offset() % 2 == 0 and out.is_contiguous():
        torch.index_select(table, 0, index, out=out.view(torch.int64))
    else:
        out.copy_(table.index_select(0, index).view(torch.float32)[:m])


# Encoding by table (E3M0Codec._pack_by_table): w = (bits >> 22) − offset lies in [−1005, 18], indexed
# as w + _W_BASE; _CODE_OF_W is the code of w (see there), _PAIR_CODES[lo + _W_SPAN·hi] a packed byte.
_W_BASE, _W_SPAN = 1008, 1040


def _code_of_w() -> torch.Tensor:
    w = torch.arange(_W_SPAN, dtype=torch.int32) - _W_BASE
    negative = w <= -497
    v = torch.where(negative, w + 512, w)
    code = torch.maximum(v >> 1, v.clamp(0, 1))
    return (code + 8 * negative.to(torch.int32)).to(torch.uint8)


def _make_pair_codes() -> torch.Tensor:
    c = _code_of_w()
    return (c[None, :] | c[:, None] << 4).reshape(-1)


def _pair_codes(device) -> torch.Tensor:
    return _on(device, "codes", _make_pair_codes)


def _absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block max |x| of x (a whole number of blocks); NaN if a block holds one. Two reductions
    beat abs() + amax and aminmax, which are not vectorised as well."""
    blocks = x.view(-1, block)
    return torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg())
