"""How N processes split one denoiser call: CFG degree × Ulysses degree × ring degree (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

from hallo3_cli.errors import UsageError


class ParallelUsageError(UsageError):
    """An impossible ``--parallel video`` split (a usage error: exit code 2)."""


@dataclass(frozen=True)
class Degrees:
    """``cfg`` (1 or 2: the CFG halves on different ranks) × ``ulysses`` (heads split by all-to-all)
    × ``ring`` (queries split, keys/values all-gathered) = the world size.

    ``ring`` is ring attention with the all-gather rotation (diffusers' ``rotate_method="allgather"``):
    each rank holds one layer's full keys/values at once (sizes in bench/RESULTS.md), so no
    log-sum-exp merge is needed."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def sequence(self) -> int:
        """Ranks sharing one CFG half's sequence."""
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring

    def __str__(self) -> str:
        return f"cfg {self.cfg} × ulysses {self.ulysses} × ring {self.ring}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_degrees(world_size: int, heads: int) -> list[Degrees]:
    """Every split of ``world_size`` ranks: cfg 1 or 2, ulysses dividing ``heads``, product = world size."""
    out = []
    for cfg in (1, 2):
        if world_size % cfg:
            continue
        sequence = world_size // cfg
        for ulysses in reversed(_divisors(sequence)):
            if heads % ulysses == 0:
                out.append(Degrees(cfg, ulysses, sequence // ulysses))
    return out


def choose_degrees(
    world_size: int,
    heads: int,
    *,
    cfg_parallel: bool | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
) -> Degrees:
    """The split of ``world_size`` ranks for a model with ``heads`` attention heads.

    Automatic choice: CFG parallel whenever the world size is even (its only communication is one
    gather of the output per step), then as much Ulysses as the head count allows (all-to-all moves
    each rank's own tokens; the ring all-gather moves everyone's keys/values to everyone), the rest
    ring. ``cfg_parallel``/``ulysses``/``ring`` fix a degree; an impossible combination raises
    :class:`ParallelUsageError` naming the valid ones.
    """
    if world_size < 1 or heads < 1:
        raise ParallelUsageError(f"world size and head count must be positive, got {world_size} and {heads}")
    for name, value in (("--ulysses", ulysses), ("--ring", ring)):
        if value is not None and value < 1:
            raise ParallelUsageError(f"{name} must be at least 1, got {value}")
    valid = valid_degrees(world_size, heads)
    candidates = [
        d for d in valid
        if (cfg_parallel is None or d.cfg == (2 if cfg_parallel else 1))
        and (ulysses is None or d.ulysses == ulysses)
        and (ring is None or d.ring == ring)
    ]
    if not candidates:
        asked = [f"{world_size} processes"]
        if cfg_parallel is not None:
            asked.append("--cfg-parallel" if cfg_parallel else "--no-cfg-parallel")
        if ulysses is not None:
            asked.append(f"--ulysses {ulysses}")
        if ring is not None:
            asked.append(f"--ring {ring}")
        raise ParallelUsageError(
            f"cannot split {', '.join(asked)} (cfg is 1 or 2, ulysses must divide the {heads} heads, "
            f"cfg × ulysses × ring must equal {world_size}); valid: {'; '.join(map(str, valid))}"
        )
    # valid_degrees lists cfg 1 before 2 and, within each, the largest ulysses first.
    if cfg_parallel is None:
        with_cfg = [d for d in candidates if d.cfg == 2]
        candidates = with_cfg or candidates
    return candidates[0]
